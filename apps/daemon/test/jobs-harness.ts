/**
 * Side-by-side harness for job scenarios: the same scripted QMP runs against qemu-storage-daemon 7.2 and
 * blkd (in-process), each in its own temp dir with the same images. What is compared (architecture.md's
 * masking rules): command returns and errors (temp dir, generated node names masked), each job's own
 * sequence of statuses and BLOCK_JOB_* events (never the interleaving of different jobs or of events with
 * returns, which races; progress masked unless a scenario asks for exact figures), and the images left
 * behind (qemu-img compare across the two dirs, qemu-img info with the dir masked).
 */
import { nbdDriver } from "@blk/drivers/nbd";
import { type QmpClient as Client, QmpClient, QmpError, type QmpEvent } from "@blk/qmp";
import { makeTempDir, run, spawnPeer, type TempDir, waitForPath } from "@blk/testkit";
import { expect } from "vitest";
import { createDaemon } from "../src/index.ts";
import { recordEvents } from "./event-log.ts";

export const MiB = 1 << 20;
export type Side = "qsd" | "blkd";

export interface Ctx {
  readonly side: Side;
  /** The scenario's temp dir (images, sockets). */
  readonly dir: string;
  readonly qmp: Client;
  /** Runs a command and records its masked return or error; returns the raw return (undefined on error). */
  exec(cmd: string, args?: Record<string, unknown>, mask?: (v: unknown) => unknown): Promise<unknown>;
  /**
   * A query whose answer may still change for a moment after an event (blkd closes a job's anonymous
   * target asynchronously: its file node lingers until the image is flushed): repeats it until two answers
   * 20 ms apart agree (at most 2 s), and records that one.
   */
  settled(cmd: string, args?: Record<string, unknown>, mask?: (v: unknown) => unknown): Promise<unknown>;
  /** Like exec, but fails the scenario when the command fails. */
  must(cmd: string, args?: Record<string, unknown>, mask?: (v: unknown) => unknown): Promise<unknown>;
  /** Waits for job `id` to reach `status`, counting events since the last exec (or since `since`). */
  waitStatus(id: string, status: string, since?: number): Promise<void>;
  /** Waits for an event (since the last exec) whose data matches `where`. */
  waitEvent(name: string, where?: (d: Record<string, unknown>) => boolean): Promise<QmpEvent>;
  /** Event mark right before the last exec. */
  readonly lastMark: number;
  /** Records a value in the transcript. */
  note(label: string, value: unknown): void;
}

export interface Outcome {
  side: Side;
  dir: TempDir;
  transcript: unknown[];
  /** Per job id: its statuses (`s:…`) and BLOCK_JOB_* events in order. */
  jobs: Record<string, string[]>;
}

export interface ScenarioOptions {
  /** Creates the images in `dir` (runs once per side); may return a cleanup run after the daemon stopped. */
  setup(dir: TempDir): Promise<void | (() => Promise<void>)>;
  /** Command-line options for both daemons (`[name, value]`, after setup). */
  options?(dir: TempDir): (readonly [string, string])[];
  scenario(ctx: Ctx): Promise<void>;
  /** Keep `offset`/`len` of BLOCK_JOB_* events and query results (deterministic scenarios). */
  exactProgress?: boolean;
}

const maskString = (s: string, dir: string): string =>
  s.replaceAll(dir, "$DIR").replace(/#block\d+/g, "#block");

/** Masks the temp dir and generated node names everywhere, and progress/busy when racy. */
export function mask(v: unknown, dir: string, progress: boolean): unknown {
  if (typeof v === "string") return maskString(v, dir);
  if (Array.isArray(v)) return v.map((e) => mask(e, dir, progress));
  if (typeof v === "object" && v !== null) {
    const out: Record<string, unknown> = {};
    for (const [k, e] of Object.entries(v)) {
      if (k === "actual-size" || k === "busy") out[k] = "<masked>";
      else if (!progress && ["offset", "len", "current-progress", "total-progress"].includes(k))
        out[k] = "<progress>";
      else out[k] = mask(e, dir, progress);
    }
    return out;
  }
  return v;
}

/**
 * Per-job sequences. Backup's transient `paused`/`running` right after its start is QEMU's accident
 * (architecture.md): dropped on both sides.
 */
function jobSequences(events: readonly QmpEvent[], dir: string, progress: boolean): Record<string, string[]> {
  const out: Record<string, string[]> = {};
  const push = (id: string, entry: string): void => {
    const seq = out[id] ?? [];
    seq.push(entry);
    out[id] = seq;
  };
  for (const e of events) {
    const d = e.data as Record<string, unknown>;
    if (e.event === "JOB_STATUS_CHANGE") {
      push(String(d.id), `s:${String(d.status)}`);
    } else if (e.event.startsWith("BLOCK_JOB_")) {
      const id = String(d.device ?? d.id);
      const rest = { ...d };
      delete rest.device;
      delete rest.id;
      const masked = mask(rest, dir, progress) as Record<string, unknown>;
      const sorted = Object.fromEntries(
        Object.keys(masked)
          .sort()
          .map((k) => [k, masked[k]]),
      );
      push(id, `${e.event} ${JSON.stringify(sorted)}`);
    }
  }
  for (const [id, seq] of Object.entries(out)) {
    if (seq[0] === "s:created" && seq[1] === "s:running" && seq[2] === "s:paused" && seq[3] === "s:running")
      seq.splice(2, 2);
    // Several requests in flight may fail at once: how many BLOCK_JOB_ERRORs precede the pause races.
    out[id] = seq.filter((x, i) => !(x.startsWith("BLOCK_JOB_ERROR ") && x === seq[i - 1]));
  }
  return out;
}

async function startQsd(
  dir: TempDir,
  options: readonly (readonly [string, string])[],
): Promise<{ qmp: QmpClient; stop(): Promise<void> }> {
  const sock = dir.join("qsd.sock");
  const args = ["--chardev", `socket,id=m,path=${sock},server=on,wait=off`, "--monitor", "m"];
  for (const [name, arg] of options) args.push(`--${name}`, arg);
  // qemu-storage-daemon 7.2 rarely hangs at start-up: time out and retry.
  for (let attempt = 1; ; attempt++) {
    const peer = await spawnPeer("qemu-storage-daemon", args, { timeoutMs: 120_000 });
    try {
      await waitForPath(sock, 5000);
      let qmp: QmpClient | undefined;
      for (let i = 0; qmp === undefined; i++) {
        try {
          qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 5000 });
        } catch (e) {
          if (i >= 50) throw e;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const client = qmp;
      return {
        qmp: client,
        stop: async () => {
          await client.close().catch(() => {});
          await peer.stop();
        },
      };
    } catch (e) {
      await peer.stop(0);
      if (attempt >= 3) throw new Error(`qemu-storage-daemon did not start: ${peer.output()}`, { cause: e });
    }
  }
}

async function startBlkd(
  dir: TempDir,
  options: readonly (readonly [string, string])[],
): Promise<{ qmp: QmpClient; stop(): Promise<void> }> {
  const daemon = await createDaemon({ log: () => {} });
  // blkd does not register the NBD client driver yet; the error-target scenarios need it.
  if (daemon.drivers.get("nbd") === undefined) daemon.drivers.register(nbdDriver);
  const sock = dir.join("blkd.sock");
  await daemon.qmp.listen({ path: sock });
  const qmp = await QmpClient.connect({ path: sock });
  // The same options a command line gives, applied through QMP-equivalent handlers.
  for (const [name, value] of options) {
    if (name !== "blockdev") throw new Error(`harness: option --${name} not supported`);
    await daemon.execute("blockdev-add", JSON.parse(value) as Record<string, unknown>);
  }
  return {
    qmp,
    stop: async () => {
      await qmp.close().catch(() => {});
      await daemon.close();
    },
  };
}

async function runSide(side: Side, opts: ScenarioOptions): Promise<Outcome> {
  const dir = makeTempDir(`jobs-${side}`);
  let cleanup: (() => Promise<void>) | undefined;
  try {
    cleanup = (await opts.setup(dir)) ?? undefined;
    const cmdline = opts.options?.(dir) ?? [];
    const d = side === "qsd" ? await startQsd(dir, cmdline) : await startBlkd(dir, cmdline);
    const transcript: unknown[] = [];
    const progress = opts.exactProgress === true;
    const log = recordEvents(d.qmp);
    let lastMark = d.qmp.eventMark();
    const record = async (
      fail: boolean,
      cmd: string,
      args?: Record<string, unknown>,
      m?: (v: unknown) => unknown,
    ): Promise<unknown> => {
      lastMark = d.qmp.eventMark();
      try {
        const r = await d.qmp.execute(cmd, args);
        transcript.push({ cmd, return: mask(m === undefined ? r : m(r), dir.path, progress) });
        return r;
      } catch (e) {
        if (!(e instanceof QmpError)) throw e;
        transcript.push({ cmd, error: { class: e.errorClass, desc: maskString(e.desc, dir.path) } });
        if (fail) throw new Error(`${side}: ${cmd} failed: ${e.desc}`);
        return undefined;
      }
    };
    const ctx: Ctx = {
      side,
      dir: dir.path,
      qmp: d.qmp,
      get lastMark() {
        return lastMark;
      },
      exec: (c, a, m) => record(false, c, a, m),
      settled: async (c, a, m) => {
        const view = async () => JSON.stringify((m ?? ((v: unknown) => v))(await d.qmp.execute(c, a)));
        let prev = await view();
        for (let i = 0; i < 100; i++) {
          await new Promise((res) => setTimeout(res, 20));
          const next = await view();
          if (next === prev) break;
          prev = next;
        }
        return record(false, c, a, m);
      },
      must: (c, a, m) => record(true, c, a, m),
      waitStatus: async (id, status, since) => {
        await d.qmp.waitEvent("JOB_STATUS_CHANGE", {
          since: since ?? lastMark,
          where: (x) => x.id === id && x.status === status,
          timeoutMs: 20_000,
        });
      },
      waitEvent: (name, where) =>
        d.qmp.waitEvent(name, {
          since: lastMark,
          ...(where === undefined ? {} : { where }),
          timeoutMs: 20_000,
        }),
      note: (label, value) => transcript.push({ note: label, value: mask(value, dir.path, progress) }),
    };
    try {
      await opts.scenario(ctx);
      await log.settled();
    } finally {
      log.stop();
      await d.stop();
    }
    return { side, dir, transcript, jobs: jobSequences(log.events, dir.path, progress) };
  } catch (e) {
    await dir.dispose();
    throw e;
  } finally {
    if (typeof cleanup === "function") await cleanup();
  }
}

/** Runs the scenario on qsd, then on blkd; both dirs stay until the returned pair is disposed. */
export async function sideBySide(
  opts: ScenarioOptions,
): Promise<{ qsd: Outcome; blkd: Outcome } & AsyncDisposable> {
  const t0 = performance.now();
  const qsd = await runSide("qsd", opts);
  const t1 = performance.now();
  let blkd: Outcome;
  try {
    blkd = await runSide("blkd", opts);
    if (process.env.BLK_JOBS_SBS_DUMP !== undefined)
      console.log(`qsd ${(t1 - t0).toFixed(0)} ms, blkd ${(performance.now() - t1).toFixed(0)} ms`);
  } catch (e) {
    await qsd.dir.dispose();
    throw e;
  }
  return {
    qsd,
    blkd,
    [Symbol.asyncDispose]: async () => {
      await qsd.dir.dispose();
      await blkd.dir.dispose();
    },
  };
}

/** Expects equal transcripts and per-job sequences (soft, step by step). */
export function expectSame(r: { qsd: Outcome; blkd: Outcome }): void {
  if (process.env.BLK_JOBS_SBS_DUMP !== undefined)
    console.log(JSON.stringify({ qsd: r.qsd.transcript, jobs: r.qsd.jobs }, null, 1));
  expect(r.blkd.transcript.length, "transcript length").toBe(r.qsd.transcript.length);
  for (let i = 0; i < r.qsd.transcript.length; i++)
    expect.soft(r.blkd.transcript[i], `step ${i}`).toEqual(r.qsd.transcript[i]);
  expect.soft(r.blkd.jobs, "per-job event sequences").toEqual(r.qsd.jobs);
}

async function ok(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args, { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

export const qemuImg = (...args: string[]): Promise<string> => ok("qemu-img", args);
export const qemuIo = (...args: string[]): Promise<string> => ok("qemu-io", args);

/**
 * The scenarios' chain in `dir`: base.qcow2 (0x11 at 0, 1 MiB) ← src.qcow2 (0x22 at 2 MiB, 1 MiB; 0x33 at
 * 6 MiB, 512 KiB), 8 MiB; plus an empty 8 MiB qcow2 for each name in `targets`.
 */
export async function chain(dir: TempDir, ...targets: string[]): Promise<void> {
  await qemuImg("create", "-q", "-f", "qcow2", dir.join("base.qcow2"), "8M");
  await qemuIo("-c", "write -P 0x11 0 1M", dir.join("base.qcow2"));
  await qemuImg(
    "create",
    "-q",
    "-f",
    "qcow2",
    "-b",
    dir.join("base.qcow2"),
    "-F",
    "qcow2",
    dir.join("src.qcow2"),
  );
  await qemuIo("-c", "write -P 0x22 2M 1M", "-c", "write -P 0x33 6M 512k", dir.join("src.qcow2"));
  for (const t of targets) await qemuImg("create", "-q", "-f", "qcow2", dir.join(t), "8M");
}
/** `qemu-img info` with the dir masked and sizes on disk dropped. */
export async function imageInfo(dir: string, file: string): Promise<unknown> {
  const info = JSON.parse(await qemuImg("info", "--output=json", "-U", `${dir}/${file}`)) as Record<
    string,
    unknown
  >;
  const { "actual-size": _a, "dirty-flag": _d, ...rest } = info;
  return mask(rest, dir, true);
}

/**
 * Expects `file` (read through its backing chain) to have the same content in both dirs, and the same
 * `qemu-img info` (format, size, backing file name and format).
 */
export async function expectSameImage(
  r: { qsd: Outcome; blkd: Outcome },
  file: string,
  opts: { format?: string } = {},
): Promise<void> {
  const a = `${r.qsd.dir.path}/${file}`;
  const b = `${r.blkd.dir.path}/${file}`;
  const f = opts.format === undefined ? [] : ["-f", opts.format, "-F", opts.format];
  const cmp = await run("qemu-img", ["compare", "-U", ...f, a, b]);
  let detail = "";
  if (cmp.code !== 0) {
    const map = async (p: string) => (await run("qemu-img", ["map", "-U", "--output=json", p])).stdout;
    detail = `\nqsd: ${await map(a)}\nblkd: ${await map(b)}`;
  }
  expect.soft(cmp.code, `${file}: ${cmp.stdout}${cmp.stderr}${detail}`).toBe(0);
  expect
    .soft(await imageInfo(r.blkd.dir.path, file), `${file} info`)
    .toEqual(await imageInfo(r.qsd.dir.path, file));
  if ((await imageInfo(r.blkd.dir.path, file)) instanceof Object && opts.format !== "raw") {
    const check = await run("qemu-img", ["check", "-U", b]);
    expect.soft(check.code, `${file} check: ${check.stdout}`).toBe(0);
  }
}

/** Writes through an NBD export with qemu-io (`-f raw nbd+unix:///NAME?socket=SOCK`). */
export function nbdWrite(sock: string, name: string, ...cmds: string[]): Promise<string> {
  return qemuIo("-f", "raw", ...cmds.flatMap((c) => ["-c", c]), `nbd+unix:///${name}?socket=${sock}`);
}
