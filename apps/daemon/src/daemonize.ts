/**
 * `--daemonize` as qemu-storage-daemon does it, without fork(): the parent starts blkd again as a
 * detached child (own session, stdin on /dev/null, umask 027) and relays the child's stdout and stderr
 * until the child reports, on an inherited pipe, that it is fully up (options applied, monitors
 * listening, exports added, pid file written). Then the parent exits 0, and the child moves to `/` and
 * stops writing to its output (nobody reads it any more). When the child exits before that — a bad
 * option, a pid file locked by another daemon — the parent has relayed its error message and exits 1.
 */
import { spawn } from "node:child_process";
import { closeSync, existsSync, writeSync } from "node:fs";
import { fileURLToPath } from "node:url";

/** Environment variable telling a daemonized child which fd to report readiness on. */
const DAEMON_PIPE_ENV = "BLKD_DAEMON_PIPE_FD";

/** What {@link daemonize} writes to (the parent's stdout and stderr). */
export interface DaemonizeIo {
  out(text: string): void;
  err(text: string): void;
}

/**
 * The blkd script a daemonized child runs: the committed bin shim (`bin/blkd.cjs`), next to `src/` and
 * `dist/` (this module is in one of them, or in `dist/bundle/`).
 */
const BLKD_SCRIPT: string = (() => {
  const candidates = ["../bin/blkd.cjs", "../../bin/blkd.cjs"].map((rel) =>
    fileURLToPath(new URL(rel, import.meta.url)),
  );
  return candidates.find((path) => existsSync(path)) ?? (candidates[0] as string);
})();

/**
 * The parent's side: runs `blkd argv` as the daemon and waits until it is up (→ 0) or gone (→ 1).
 * @param argv blkd's arguments, `--daemonize` included
 */
export function daemonize(
  argv: readonly string[],
  io: DaemonizeIo,
  script: string = BLKD_SCRIPT,
): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...process.execArgv, script, ...argv], {
      detached: true,
      stdio: ["ignore", "pipe", "pipe", "pipe"],
      env: { ...process.env, [DAEMON_PIPE_ENV]: "3" },
    });
    let done = false;
    const finish = (code: number): void => {
      if (done) return;
      done = true;
      resolve(code);
    };
    child.stdout?.on("data", (d: Buffer) => io.out(d.toString()));
    child.stderr?.on("data", (d: Buffer) => io.err(d.toString()));
    const status = child.stdio[3] as NodeJS.ReadableStream | null;
    status?.on("data", (d: Buffer) => {
      if (done || d[0] !== 0) return;
      // Whatever the child wrote before reporting is already in its pipes: relay it, then let go.
      setImmediate(() => {
        child.stdout?.destroy();
        child.stderr?.destroy();
        (child.stdio[3] as { destroy?: () => void } | null)?.destroy?.();
        child.unref();
        finish(0);
      });
    });
    child.on("error", (e) => {
      io.err(`blkd: cannot start the daemon: ${e.message}\n`);
      finish(1);
    });
    // 'close' comes after the child exited and its output was read to the end.
    child.on("close", () => finish(1));
  });
}

/** The child's side: the fd to report readiness on, when this process is a daemonized blkd. */
export function daemonPipeFd(): number | undefined {
  const v = process.env[DAEMON_PIPE_ENV];
  if (v === undefined || !/^\d+$/.test(v)) return undefined;
  delete process.env[DAEMON_PIPE_ENV];
  return Number(v);
}

/**
 * The child's side once it is up: reports success to the parent, moves to `/`, and makes its stdout and
 * stderr (pipes the parent no longer reads) harmless.
 */
export function reportReady(fd: number): void {
  try {
    writeSync(fd, Buffer.from([0]));
  } finally {
    closeSync(fd);
  }
  process.chdir("/");
  // The parent is gone: writes would fail with EPIPE, which must not become uncaught errors.
  const ignore = (): void => {};
  process.stdout.on("error", ignore);
  process.stderr.on("error", ignore);
}
