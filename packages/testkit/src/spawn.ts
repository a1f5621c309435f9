import { type ChildProcess, spawn } from "node:child_process";
import { accessSync, constants, statSync } from "node:fs";
import { delimiter, join } from "node:path";
import { atProcessEnd } from "./exit.ts";

const children = new Set<ChildProcess>();
let hooked = false;
function hookExit(): void {
  if (hooked) return;
  hooked = true;
  atProcessEnd(() => {
    for (const c of children) c.kill("SIGKILL");
  });
}

/** Full path of an executable on PATH, or undefined. */
export function which(cmd: string): string | undefined {
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, cmd);
    try {
      accessSync(p, constants.X_OK);
      if (statSync(p).isFile()) return p;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** The names in `cmds` that are not on PATH (empty when all peers are installed). */
export function missingPeers(cmds: readonly string[]): string[] {
  return cmds.filter((c) => which(c) === undefined);
}

/** Result of {@link run}. */
export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Options for {@link run} and {@link spawnPeer}. */
export interface RunOptions {
  /** Milliseconds before the process is killed (SIGKILL). Default 30 s for run, none for spawnPeer. */
  timeoutMs?: number;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Bytes written to stdin, then stdin is closed. */
  input?: string | Uint8Array;
}

/** Raised by {@link run} when the program outlives its time-out. */
export class PeerTimeoutError extends Error {
  override readonly name = "PeerTimeoutError";
}

/**
 * Runs a program to completion with a time-out; never throws for a non-zero exit (inspect `code`).
 * @throws {PeerTimeoutError} when the time-out kills it
 */
export function run(cmd: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  hookExit();
  const timeoutMs = options.timeoutMs ?? 30_000;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: options.cwd,
      env: options.env ?? process.env,
      stdio: ["pipe", "pipe", "pipe"],
    });
    children.add(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on("data", (d: Buffer) => out.push(d));
    child.stderr.on("data", (d: Buffer) => err.push(d));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.on("error", (e) => {
      clearTimeout(timer);
      children.delete(child);
      reject(e);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      children.delete(child);
      const res = {
        code,
        signal,
        stdout: Buffer.concat(out).toString(),
        stderr: Buffer.concat(err).toString(),
      };
      if (timedOut)
        reject(
          new PeerTimeoutError(`${cmd} ${args.join(" ")} timed out after ${timeoutMs} ms\n${res.stderr}`),
        );
      else resolve(res);
    });
    child.stdin.on("error", () => {});
    if (options.input !== undefined) child.stdin.end(options.input);
    else child.stdin.end();
  });
}

/** What a {@link commandRunner} run gives back. */
export interface CheckedRun {
  code: number;
  out: string;
  err: string;
}

/** Runs `cmd args`, failing unless its exit code is in `ok` (default `[0]`). */
export type CommandRunner = (
  cmd: string,
  args: readonly string[],
  ok?: readonly number[],
) => Promise<CheckedRun>;

/**
 * The tests' `sh`: a {@link run} in `cwd` with a time-out that throws when the exit code is not an
 * expected one, so a failed setup step names itself.
 * @example
 * const sh = commandRunner(dir.path);
 * const { out } = await sh("qemu-img", ["info", "--output=json", "a.qcow2"]);
 * @throws {Error} `<cmd> <args> failed (<code>): <stderr><stdout>` from the runner
 */
export function commandRunner(cwd: string, timeoutMs = 60_000): CommandRunner {
  return async (cmd, args, ok = [0]) => {
    const r = await run(cmd, args, { cwd, timeoutMs });
    const code = r.code ?? -1;
    if (!ok.includes(code))
      throw new Error(`${cmd} ${args.join(" ")} failed (${code}): ${r.stderr}${r.stdout}`);
    return { code, out: r.stdout, err: r.stderr };
  };
}

/**
 * `qemu-img` and `qemu-io` (on a qcow2 image, one `-c` per command) through a runner.
 * @example
 * const { img, io } = qemuTools(commandRunner(dir.path));
 * await img("create", "-q", "-f", "qcow2", "a.qcow2", "8M");
 * await io("a.qcow2", "write -P 1 0 64k", "discard 64k 64k");
 */
export function qemuTools<T>(sh: (cmd: string, args: string[]) => Promise<T>): {
  img: (...args: string[]) => Promise<T>;
  io: (file: string, ...cmds: string[]) => Promise<T>;
} {
  return {
    img: (...args) => sh("qemu-img", args),
    io: (file, ...cmds) => sh("qemu-io", ["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), file]),
  };
}

/** A long-running peer (qemu-nbd, qemu-storage-daemon, nbdkit …) that is always killed. */
export interface Peer extends AsyncDisposable {
  readonly child: ChildProcess;
  readonly pid: number;
  /** Everything the peer printed so far (stdout and stderr interleaved). */
  output(): string;
  /** Resolves with the exit code once the process has exited. */
  readonly exited: Promise<number | null>;
  /** SIGTERM, then SIGKILL after `graceMs` (default 3 s); resolves when it has exited. Idempotent. */
  stop(graceMs?: number): Promise<void>;
}

/** Options for {@link spawnPeer}. */
export interface SpawnPeerOptions extends RunOptions {
  /** Resolve only once this returns true (polled every 20 ms), e.g. a socket file exists. */
  ready?: (output: string) => boolean | Promise<boolean>;
  /** Milliseconds to wait for `ready` before killing the peer and failing. Default 15 s. */
  readyTimeoutMs?: number;
}

/**
 * Starts a peer process and waits until it is ready. The process is killed on `stop()`, on `await using`
 * disposal, when `timeoutMs` passes, and when the test process exits or gets SIGTERM at the latest.
 * @throws {PeerTimeoutError} when it is not ready in time; Error when it exits before it is ready
 */
export async function spawnPeer(
  cmd: string,
  args: readonly string[],
  options: SpawnPeerOptions = {},
): Promise<Peer> {
  hookExit();
  const child = spawn(cmd, args, {
    cwd: options.cwd,
    env: options.env ?? process.env,
    stdio: ["pipe", "pipe", "pipe"],
  });
  children.add(child);
  let text = "";
  child.stdout.on("data", (d: Buffer) => {
    text += d.toString();
  });
  child.stderr.on("data", (d: Buffer) => {
    text += d.toString();
  });
  child.stdin.on("error", () => {});
  if (options.input !== undefined) child.stdin.end(options.input);
  let exitCode: number | null | undefined;
  const exited = new Promise<number | null>((resolve) => {
    child.on("close", (code) => {
      exitCode = code;
      children.delete(child);
      resolve(code);
    });
    child.on("error", (e) => {
      text += `\nspawn error: ${e.message}`;
      exitCode = null;
      children.delete(child);
      resolve(null);
    });
  });
  const killer =
    options.timeoutMs === undefined ? undefined : setTimeout(() => child.kill("SIGKILL"), options.timeoutMs);
  killer?.unref();
  let stopping: Promise<void> | undefined;
  const stop = (graceMs = 3000): Promise<void> => {
    stopping ??= (async () => {
      if (exitCode === undefined) {
        child.kill("SIGTERM");
        const t = setTimeout(() => child.kill("SIGKILL"), graceMs);
        await exited;
        clearTimeout(t);
      }
      if (killer) clearTimeout(killer);
    })();
    return stopping;
  };
  const peer: Peer = {
    child,
    pid: child.pid ?? -1,
    output: () => text,
    exited,
    stop,
    [Symbol.asyncDispose]: () => stop(),
  };
  if (options.ready) {
    const deadline = Date.now() + (options.readyTimeoutMs ?? 15_000);
    for (;;) {
      if (exitCode !== undefined)
        throw new Error(`${cmd} exited (${exitCode}) before it was ready:\n${text}`);
      let isReady: boolean;
      try {
        isReady = await options.ready(text);
      } catch (e) {
        await stop(0); // the caller never gets the peer, so nobody else would stop it
        throw e;
      }
      if (isReady) break;
      if (Date.now() > deadline) {
        await stop(0);
        throw new PeerTimeoutError(`${cmd} not ready after ${options.readyTimeoutMs ?? 15_000} ms:\n${text}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  return peer;
}

/** Polls until `path` exists (a unix socket, a pid file). */
export async function waitForPath(path: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      statSync(path);
      return;
    } catch {
      if (Date.now() > deadline) throw new PeerTimeoutError(`${path} did not appear within ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}
