/** Helpers for tests that run blkd (and qemu-storage-daemon) as real, possibly daemonized, processes. */
import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

/** The committed bin shim, the package's `blkd` (runs dist/bundle/ when it is up to date, else dist/main.js). */
export const BLKD = fileURLToPath(new URL("../bin/blkd.cjs", import.meta.url));
/** True when dist/ is built (the bin needs it). */
export const BUILT = existsSync(fileURLToPath(new URL("../dist/main.js", import.meta.url)));
/** The bundle's manifest (`pnpm build` writes it after `tsc -b`). */
export const BUNDLE_MANIFEST = fileURLToPath(new URL("../dist/bundle/manifest.json", import.meta.url));

/** True while process `pid` exists (zombies of other parents count as gone). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, "utf8"));
  } catch {
    return false;
  }
}

/** Polls until `cond()` holds; throws after `timeoutMs`. */
export async function until(cond: () => boolean, what: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Daemons a test started, killed when it ends whatever happened. */
export class Daemons implements AsyncDisposable {
  readonly #pids = new Set<number>();

  /** Remembers the daemon whose pid is in `pidfile` (if it is there). */
  track(pidfile: string): number | undefined {
    if (!existsSync(pidfile)) return undefined;
    const pid = Number(readFileSync(pidfile, "utf8").trim());
    if (Number.isInteger(pid) && pid > 0) this.#pids.add(pid);
    return pid;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    for (const pid of this.#pids) {
      if (!alive(pid)) continue;
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone meanwhile
      }
      await until(() => !alive(pid), `pid ${pid} to die`, 5000).catch(() => {});
    }
  }
}

/** stderr without blkd's JSON log lines. */
export const errorLines = (stderr: string): string[] =>
  stderr.split("\n").filter((l) => l !== "" && !l.startsWith("{"));
