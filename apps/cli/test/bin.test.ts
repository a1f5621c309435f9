/** The committed bin shim runs the built CLI (needs `dist/`, which `test:all` builds first). */
import { closeSync, existsSync, openSync, writeSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { makeTempDir, run } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";

const bin = fileURLToPath(new URL("../bin/blk-img.js", import.meta.url));
const built = existsSync(fileURLToPath(new URL("../dist/main.js", import.meta.url)));
if (!built)
  console.warn("skipping the bin/blk-img.js test: apps/cli/dist/main.js is not built (run the build first)");

describe.skipIf(!built)("bin/blk-img.js", () => {
  it("prints the version and exits 0; a usage error exits 1 with one line", async () => {
    const v = await run(process.execPath, [bin, "--version"], { timeoutMs: 20_000 });
    expect(v.code).toBe(0);
    expect(v.stdout).toMatch(/^blk-img version \d+\.\d+\.\d+ \(compatible with qemu-img 7\.2\.0\)\n$/);
    const e = await run(process.execPath, [bin, "nosuchcommand"], { timeoutMs: 20_000 });
    expect(e.code).toBe(1);
    expect(e.stderr).toBe(
      "blk-img: Command not found: nosuchcommand\nTry 'blk-img --help' for more information\n",
    );
  });
});

describe.skipIf(!built)("bin/blk-img.js with a closed pipe", () => {
  const dir = makeTempDir("blk-img-bin");
  afterAll(() => dir.dispose());
  it("stops quietly (no stack trace) when the reader goes away, like qemu-img on SIGPIPE", async () => {
    // 4000 data extents: a map far larger than a pipe buffer.
    const img = dir.join("frag.raw");
    const fd = openSync(img, "w");
    for (let i = 0; i < 4000; i++) writeSync(fd, new Uint8Array(4096).fill(1), 0, 4096, i * 8192);
    closeSync(fd);
    const err = dir.join("err.txt");
    const r = await run(
      "sh",
      [
        "-c",
        `"${process.execPath}" "${bin}" map --output=json "${img}" 2>"${err}" | head -c 100 >/dev/null; cat "${err}"`,
      ],
      { timeoutMs: 30_000 },
    );
    expect(r.code).toBe(0);
    expect(r.stdout).toBe("");
  });
});
