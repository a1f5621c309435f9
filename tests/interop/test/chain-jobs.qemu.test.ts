// Stream and commit on real 3-image qcow2 chains (made by qemu-img/qemu-io) while a guest writes through an
// NBD export of the device: the chain blkd leaves behind must hold exactly the original chain's content
// (as `qemu-img convert` flattens it) plus the guest's writes, with the backing links QEMU would write, and
// `qemu-img check` clean. Failure runs inject an I/O error with blkdebug: the chain must still read
// correctly, and a second run must finish the job.
import { closeSync, openSync, readFileSync, writeSync } from "node:fs";
import { createDaemon } from "@blk/daemon";
import { NbdClient } from "@blk/drivers/nbd";
import { QmpClient } from "@blk/qmp";
import { makeTempDir, missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";

const PEERS = ["qemu-img", "qemu-io"];
const missing = missingPeers(PEERS);
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;

type Dir = ReturnType<typeof makeTempDir>;

async function ok(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args, { timeoutMs: 30_000 });
  expect(r.code, `${cmd} ${args.join(" ")}: ${r.stderr}`).toBe(0);
  return r.stdout;
}

/** A deterministic xorshift byte pattern. */
function pattern(seed: number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  const v = new DataView(b.buffer);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i + 4 <= len; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    v.setUint32(i, x >>> 0, true);
  }
  return b;
}

/**
 * base ← mid ← top, 8 MiB, 64 KiB clusters. Overlapping writes so every layer shadows some of the one
 * below, partial clusters included, plus a zeroed range in mid over base data.
 */
async function makeChain(dir: Dir): Promise<void> {
  const img = (n: string) => dir.join(`${n}.qcow2`);
  await ok("qemu-img", ["create", "-q", "-f", "qcow2", img("base"), String(SIZE)]);
  await ok("qemu-io", [
    "-f",
    "qcow2",
    ...["-c", "write -P 0x11 0 3M", "-c", "write -P 0x12 5M 1M", "-c", "write -P 0x13 7M 4k"],
    img("base"),
  ]);
  await ok("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img("mid")]);
  await ok("qemu-io", [
    "-f",
    "qcow2",
    ...["-c", "write -P 0x22 1M 1M", "-c", "write -z 2560k 256k", "-c", "write -P 0x23 4M 1536k"],
    img("mid"),
  ]);
  await ok("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", img("top")]);
  await ok("qemu-io", [
    "-f",
    "qcow2",
    ...["-c", "write -P 0x33 1536k 1M", "-c", "write -P 0x34 6M 8k", "-c", "write -P 0x35 5000k 3k"],
    img("top"),
  ]);
}

/** What the chain reads as, flattened by qemu-img into a raw file the guest's writes are then applied to. */
class Expected {
  readonly path: string;
  constructor(dir: Dir) {
    this.path = dir.join("expected.raw");
  }
  async fromChain(top: string): Promise<void> {
    await ok("qemu-img", ["convert", "-O", "raw", top, this.path]);
  }
  write(offset: number, data: Uint8Array): void {
    const fd = openSync(this.path, "r+");
    try {
      writeSync(fd, data, 0, data.length, offset);
    } finally {
      closeSync(fd);
    }
  }
  async sameAs(image: string): Promise<void> {
    const r = await run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", this.path, image], {
      timeoutMs: 30_000,
    });
    expect(`${r.stdout.trim()} (${r.code})`, r.stderr).toBe("Images are identical. (0)");
  }
  bytes(offset: number, len: number): Uint8Array {
    return readFileSync(this.path).subarray(offset, offset + len);
  }
}

async function checkClean(image: string): Promise<void> {
  const r = await run("qemu-img", ["check", "--output=json", image], { timeoutMs: 30_000 });
  expect(r.code, r.stdout + r.stderr).toBe(0);
  const report = JSON.parse(r.stdout) as { corruptions?: number; leaks?: number; "check-errors": number };
  expect(report.corruptions ?? 0).toBe(0);
  expect(report.leaks ?? 0).toBe(0);
  expect(report["check-errors"]).toBe(0);
}

async function backingOf(image: string): Promise<string | undefined> {
  const info = JSON.parse(await ok("qemu-img", ["info", "--output=json", "-U", image])) as {
    "backing-filename"?: string;
    "backing-filename-format"?: string;
  };
  return info["backing-filename"] === undefined
    ? undefined
    : `${info["backing-filename"]} (${info["backing-filename-format"]})`;
}

interface Session {
  qmp: QmpClient;
  guest: NbdClient;
  close(): Promise<void>;
}

/**
 * blkd (in this process) with the chain opened from `top` (the header's backing links), `base` optionally
 * behind a blkdebug filter with `baseErrors` rules, and the top exported over NBD to a guest client.
 */
async function startSession(dir: Dir, baseErrors?: Record<string, unknown>[]): Promise<Session> {
  const img = (n: string) => dir.join(`${n}.qcow2`);
  const daemon = await createDaemon({ log: () => {} });
  const qmpPath = dir.join(`qmp-${Date.now()}.sock`);
  await daemon.qmp.listen({ path: qmpPath });
  const qmp = await QmpClient.connect({ path: qmpPath });
  const file = (n: string) => ({ driver: "file", filename: img(n) });
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "base",
    file:
      baseErrors === undefined
        ? file("base")
        : { driver: "blkdebug", image: file("base"), "inject-error": baseErrors },
  });
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "mid",
    file: file("mid"),
    backing: "base",
  });
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "top",
    file: file("top"),
    backing: "mid",
  });
  const nbdPath = dir.join(`nbd-${Date.now()}.sock`);
  await qmp.execute("nbd-server-start", { addr: { type: "unix", data: { path: nbdPath } } });
  await qmp.execute("block-export-add", {
    type: "nbd",
    id: "exp0",
    "node-name": "top",
    name: "disk",
    writable: true,
  });
  const guest = await NbdClient.connect({ server: { type: "unix", path: nbdPath }, export: "disk" });
  return {
    qmp,
    guest,
    async close() {
      await guest.close().catch(() => {});
      await qmp.close().catch(() => {});
      await daemon.close();
    },
  };
}

/**
 * A guest writing deterministic patterns (4–68 KiB, unaligned) until `stop()`; every acknowledged write
 * is applied to the expected image too. Writes never overlap each other in flight (one at a time).
 */
function startGuest(guest: NbdClient, expected: Expected, seed: number) {
  const state = { running: true };
  let n = 0;
  let x = seed;
  const rand = (m: number) => {
    x = (x * 1103515245 + 12345) >>> 0;
    return x % m;
  };
  const done = (async () => {
    while (state.running) {
      const len = (1 + rand(17)) * 4 * KiB;
      const off = rand(SIZE - len - 512) + (rand(2) === 0 ? 0 : 512);
      const data = pattern(seed * 100_000 + n, len);
      await guest.write(off, data);
      expected.write(off, data);
      n++;
      await new Promise((r) => setTimeout(r, 1));
    }
  })();
  return {
    get writes() {
      return n;
    },
    async stop() {
      state.running = false;
      await done;
      await guest.flush();
    },
  };
}

/** Resolves with the first of `events` (e.g. BLOCK_JOB_COMPLETED / _CANCELLED / _READY) for job `id`. */
async function jobEvent(qmp: QmpClient, since: number, id: string, events: string[]) {
  const waits = events.map((name) =>
    qmp.waitEvent<{ device?: string }>(name, { since, where: (d) => d.device === id, timeoutMs: 45_000 }),
  );
  // The losers time out later: keep their rejections handled.
  for (const w of waits) w.catch(() => {});
  return Promise.any(waits);
}

/** A fresh temp dir with the chain, and what its top reads as. */
async function freshChain(prefix: string): Promise<{ dir: Dir; expected: Expected }> {
  const dir = makeTempDir(prefix);
  await makeChain(dir);
  const expected = new Expected(dir);
  await expected.fromChain(dir.join("top.qcow2"));
  return { dir, expected };
}

const ENDS = ["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"];

/**
 * Runs one job in a fresh session and returns its end event's error (undefined: it completed). With
 * `guestSeed`, a guest writes through the export for as long as the job runs (and `complete` asks for
 * READY, then block-job-complete, then 5 more guest writes that land after the switch). With `failed`,
 * the guest then reads the whole disk, which must still read as expected.
 */
async function runJob(
  dir: Dir,
  expected: Expected,
  command: string,
  args: { "job-id": string } & Record<string, unknown>,
  opts: { guestSeed?: number; baseErrors?: Record<string, unknown>[]; complete?: boolean } = {},
): Promise<string | undefined> {
  const s = await startSession(dir, opts.baseErrors);
  try {
    const writer = opts.guestSeed === undefined ? undefined : startGuest(s.guest, expected, opts.guestSeed);
    const id = args["job-id"];
    const mark = s.qmp.eventMark();
    await s.qmp.execute(command, args);
    if (opts.complete === true) {
      await jobEvent(s.qmp, mark, id, ["BLOCK_JOB_READY"]);
      await s.qmp.execute("block-job-complete", { device: id });
    }
    const end = await jobEvent(s.qmp, mark, id, ENDS);
    expect(end.event).toBe("BLOCK_JOB_COMPLETED");
    if (writer !== undefined) {
      const after = writer.writes;
      if (opts.complete === true)
        while (writer.writes < after + 5) await new Promise((r) => setTimeout(r, 5));
      await writer.stop();
      expect(writer.writes).toBeGreaterThan(0);
    }
    const error = (end.data as { error?: string }).error;
    if (error !== undefined) {
      // A failed job leaves the chain in place: the guest still reads the right data everywhere.
      for (let off = 0; off < SIZE; off += MiB) {
        const got = await s.guest.read(off, MiB);
        expect(Buffer.from(got).equals(Buffer.from(expected.bytes(off, MiB))), `at ${off}`).toBe(true);
      }
    }
    return error;
  } finally {
    await s.close();
  }
}

/** The image's backing link, its check and its content (through its chain) against the expected one. */
async function expectChain(dir: Dir, expected: Expected, image: string, backing: string | undefined) {
  expect(await backingOf(dir.join(image))).toBe(backing);
  await checkClean(dir.join(image));
  await expected.sameAs(dir.join(image));
}

describe.skipIf(missing.length > 0)(
  "stream and commit on qcow2 chains with a live guest",
  { tags: ["qemu"] },
  () => {
    it("block-stream of the whole chain while the guest writes: top holds everything, no backing", async () => {
      const { dir, expected } = await freshChain("blk-chain-stream");
      await using _ = dir;
      // 4 MiB/s over ~6 MiB of backing data: the guest gets time to write while the job copies.
      const args = { "job-id": "s0", device: "top", speed: 4 * MiB };
      expect(await runJob(dir, expected, "block-stream", args, { guestSeed: 7 })).toBeUndefined();
      await expectChain(dir, expected, "top.qcow2", undefined);
    });

    it("block-stream with base-node=base while the guest writes: mid's data pulled up, top backed by base", async () => {
      const { dir, expected } = await freshChain("blk-chain-stream-base");
      await using _ = dir;
      const args = { "job-id": "s1", device: "top", "base-node": "base", speed: 2 * MiB };
      expect(await runJob(dir, expected, "block-stream", args, { guestSeed: 11 })).toBeUndefined();
      await expectChain(dir, expected, "top.qcow2", `${dir.join("base.qcow2")} (qcow2)`);
      await checkClean(dir.join("base.qcow2"));
    });

    it("intermediate block-commit of mid into base while the guest writes to top", async () => {
      const { dir, expected } = await freshChain("blk-chain-commit");
      await using _ = dir;
      const args = { "job-id": "c0", device: "top", "top-node": "mid", "base-node": "base", speed: 4 * MiB };
      expect(await runJob(dir, expected, "block-commit", args, { guestSeed: 13 })).toBeUndefined();
      await expectChain(dir, expected, "top.qcow2", `${dir.join("base.qcow2")} (qcow2)`);
      await checkClean(dir.join("base.qcow2"));
    });

    it("active block-commit of the whole chain while the guest writes: READY, complete, the export now serves base", async () => {
      const { dir, expected } = await freshChain("blk-chain-active");
      await using _ = dir;
      const args = { "job-id": "c1", device: "top", "base-node": "base" };
      // The guest keeps writing after the switch: those writes land in base.
      expect(
        await runJob(dir, expected, "block-commit", args, { guestSeed: 17, complete: true }),
      ).toBeUndefined();
      await expectChain(dir, expected, "base.qcow2", undefined);
    });

    it("a stream that fails on a read error leaves a chain that reads correctly; a second run finishes", async () => {
      const { dir, expected } = await freshChain("blk-chain-stream-fail");
      await using _ = dir;
      // Fail one read of base's data at 5.75 MiB (only base holds it there), well after the job started.
      const map = JSON.parse(await ok("qemu-img", ["map", "--output=json", dir.join("base.qcow2")])) as {
        start: number;
        length: number;
        offset?: number;
      }[];
      const where = 5.75 * MiB;
      const at = map.find((e) => e.start <= where && where < e.start + e.length && e.offset !== undefined);
      if (at?.offset === undefined) throw new Error("base has no data at 5.75 MiB");
      const sector = (at.offset + (where - at.start)) / 512;
      // No guest writes here: one could allocate the failing range in top, and the job would skip it.
      const baseErrors = [{ event: "read_aio", errno: 5, sector, once: true }];
      expect(
        await runJob(dir, expected, "block-stream", { "job-id": "s2", device: "top" }, { baseErrors }),
      ).toBe("Input/output error");
      await expectChain(dir, expected, "top.qcow2", "mid.qcow2 (qcow2)");
      expect(await runJob(dir, expected, "block-stream", { "job-id": "s3", device: "top" })).toBeUndefined();
      await expectChain(dir, expected, "top.qcow2", undefined);
    });

    it("a commit that fails on a write error into base leaves a chain that reads correctly; a second run finishes", async () => {
      const { dir, expected } = await freshChain("blk-chain-commit-fail");
      await using _ = dir;
      const commit = (id: string) => ({
        "job-id": id,
        device: "top",
        "top-node": "mid",
        "base-node": "base",
      });
      // A write into base's file fails once (data or metadata: either must leave the chain intact).
      const baseErrors = [{ event: "write_aio", errno: 28, once: true }];
      expect(await runJob(dir, expected, "block-commit", commit("c2"), { baseErrors })).toBe(
        "No space left on device",
      );
      await expectChain(dir, expected, "top.qcow2", "mid.qcow2 (qcow2)");
      for (const n of ["mid", "base"]) await checkClean(dir.join(`${n}.qcow2`));
      expect(await runJob(dir, expected, "block-commit", commit("c3"))).toBeUndefined();
      await expectChain(dir, expected, "top.qcow2", `${dir.join("base.qcow2")} (qcow2)`);
      await checkClean(dir.join("base.qcow2"));
    });
  },
);
