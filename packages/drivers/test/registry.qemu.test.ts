import { writeFileSync } from "node:fs";
import { truncate } from "node:fs/promises";
import { makeTempDir, missingPeers, run } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { openImage } from "../src/registry/index.ts";

const dir = makeTempDir("blk-reg");
afterAll(() => dir.dispose());
let n = 0;
async function sparse(size: number): Promise<string> {
  const p = dir.join(`g${n++}.img`);
  writeFileSync(p, "");
  await truncate(p, size);
  return p;
}

const missing = missingPeers(["qemu-io"]);
// `pnpm test:fast` leaves this file out by its name (`*.qemu.test.ts`); it skips itself when a peer is missing.
describe.skipIf(missing.length > 0)("openImage locks against qemu-io", () => {
  it("a raw image opened writable shares write like QEMU; noShare refuses qemu-io writers", async () => {
    const p = await sparse(1 << 20);
    const img = await openImage(p, { format: "raw" });
    const ok = await run("qemu-io", ["-f", "raw", "-c", "write 0 512", p]);
    expect(ok.code).toBe(0);
    await img.close();
    const strict = await openImage(p, { format: "raw", noShare: true });
    const refused = await run("qemu-io", ["-f", "raw", "-c", "write 0 512", p]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain('Failed to get "write" lock');
    await strict.close();
    const after = await run("qemu-io", ["-f", "raw", "-c", "write 0 512", p]);
    expect(after.code).toBe(0);
  });
});
