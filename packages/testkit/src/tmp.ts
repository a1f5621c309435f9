import { mkdtempSync, rmSync } from "node:fs";
import { rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { atProcessEnd } from "./exit.ts";

const live = new Set<string>();
let hooked = false;

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  atProcessEnd(() => {
    for (const dir of live) rmSync(dir, { recursive: true, force: true });
  });
}

/** A temporary directory that is removed by `dispose()`, by `await using`, or when the process exits or gets SIGTERM at the latest. */
export interface TempDir extends AsyncDisposable {
  readonly path: string;
  /** `join(path, ...parts)` */
  join(...parts: string[]): string;
  dispose(): Promise<void>;
}

/**
 * Creates a fresh directory under the system temp dir (short path, so unix socket paths fit in 108 bytes).
 * @example
 * await using dir = makeTempDir("qcow2");
 * const img = dir.join("a.qcow2");
 */
export function makeTempDir(prefix = "blk"): TempDir {
  hookExit();
  const path = mkdtempSync(join(tmpdir(), `${prefix}-`));
  live.add(path);
  let done: Promise<void> | undefined;
  const dispose = (): Promise<void> => {
    done ??= rm(path, { recursive: true, force: true, maxRetries: 3 }).finally(() => live.delete(path));
    return done;
  };
  return {
    path,
    join: (...parts: string[]) => join(path, ...parts),
    dispose,
    [Symbol.asyncDispose]: dispose,
  };
}

/** Runs `fn` with a temp dir and removes it afterwards, whatever `fn` did. */
export async function withTempDir<T>(fn: (dir: TempDir) => Promise<T> | T, prefix = "blk"): Promise<T> {
  const dir = makeTempDir(prefix);
  try {
    return await fn(dir);
  } finally {
    await dir.dispose();
  }
}
