import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { run } from "@blk/testkit";
import { describe, expect, it } from "vitest";

// The README's demo in its short mode: blk-img and blkd as real processes, an NBD guest, a QMP-driven mirror.
// It needs the built apps (`test:all` builds before testing; a bare `vitest run` on a fresh clone does not).
const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const built = ["apps/daemon/dist/main.js", "apps/cli/dist/main.js", "packages/drivers/dist/index.js"].every(
  (f) => existsSync(join(root, f)),
);

describe("the demo", () => {
  it.skipIf(!built)(
    "runs end to end in short mode and proves target == source",
    async () => {
      const r = await run(process.execPath, [join(root, "tooling/demo/demo.mjs")], {
        env: { ...process.env, BLK_DEMO_SHORT: "1" },
        timeoutMs: 120_000,
      });
      expect(r.stderr).not.toMatch(/demo failed/);
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/BLOCK_JOB_READY after/);
      expect(r.stdout).toMatch(/blk-img compare: Images are identical\. \(exit 0\)/);
    },
    150_000,
  );
});
