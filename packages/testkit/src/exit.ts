/**
 * Last-resort cleanup when the process ends. Vitest stops its fork workers with SIGTERM, which ends a Node
 * process without an `exit` event, so cleanups run on SIGTERM as well as on `exit`.
 */
const cleanups: (() => void)[] = [];
let hooked = false;

function runAll(): void {
  for (const fn of cleanups.splice(0)) {
    try {
      fn();
    } catch {
      // best effort: the process is going away
    }
  }
}

function onSigterm(): void {
  runAll();
  process.off("SIGTERM", onSigterm);
  // Keep SIGTERM's meaning: with no other listener left, Node's default action (terminate) applies again.
  if (process.listenerCount("SIGTERM") === 0) process.kill(process.pid, "SIGTERM");
}

/** Runs `fn` (synchronous) once when the process exits or receives SIGTERM, whichever comes first. */
export function atProcessEnd(fn: () => void): void {
  cleanups.push(fn);
  if (hooked) return;
  hooked = true;
  process.once("exit", runAll);
  process.on("SIGTERM", onSigterm);
}
