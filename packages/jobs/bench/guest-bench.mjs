// What the guest-under-load benches (backup-guest-latency, mirror-convergence) share: a temp directory
// removed at exit with every child killed, a dense random raw source, fresh sparse targets, and the
// nbd-writer.mjs child as the guest. Not a bench itself.
import { spawn } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const MiB = 1024 * 1024;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * A bench's workspace under a new temp directory named after `prefix`: `source`, a dense raw file of
 * `size` bytes of random data; `freshTarget()`, an empty sparse raw file of the same size (made anew on
 * each call); `children`, the processes to kill at exit (the directory is removed then too); and
 * `startWriter(sock, bs, qd)`, which starts the guest on the NBD export `disk` at `sock` and resolves
 * once it writes, with `stop()` resolving to its statistics.
 */
export function guestWorkspace(prefix, size) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const children = new Set();
  process.on("exit", () => {
    for (const c of children) c.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  });
  for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(130));

  const source = join(dir, "src.raw");
  const fd = openSync(source, "w");
  const buf = Buffer.alloc(4 * MiB);
  for (let off = 0; off < size; off += buf.length) writeSync(fd, randomFillSync(buf), 0, buf.length, off);
  closeSync(fd);

  const freshTarget = () => {
    const t = join(dir, "tgt.raw");
    rmSync(t, { force: true });
    closeSync(openSync(t, "w"));
    truncateSync(t, size);
    return t;
  };

  async function startWriter(sock, bs, qd) {
    const child = spawn(
      process.execPath,
      [join(here, "nbd-writer.mjs"), sock, "disk", String(size), String(bs), String(qd)],
      { cwd: here, stdio: ["pipe", "pipe", "inherit"] },
    );
    children.add(child);
    const it = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
    const first = await it.next();
    if (first.value !== "ready") throw new Error(`writer: ${first.value}`);
    return {
      async stop() {
        child.stdin.end("stop\n");
        const r = await it.next();
        children.delete(child);
        return JSON.parse(r.value);
      },
    };
  }

  return { dir, children, source, freshTarget, startWriter };
}
