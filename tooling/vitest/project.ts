import { defaultServerConditions } from "vite";
import { defineProject, type UserWorkspaceConfig } from "vitest/config";

/**
 * One vitest project per workspace package. Node tests run in Vite's SSR environment, so the
 * `@blk/source` condition goes in `ssr.resolve.conditions` (plain `resolve.conditions` has no effect):
 * tests and benchmarks read each dependency's `src/` and need no build.
 */
/** Test tags shared by every project (also declared at the root, so per-package runs know them too). */
export const BLK_TAGS: { name: string; description: string; timeout: number }[] = [
  { name: "qemu", description: "needs real QEMU/NBD peers (qemu-img, qemu-nbd, nbdkit, …)", timeout: 60_000 },
];

export function blkProject(name: string, test: UserWorkspaceConfig["test"] = {}): UserWorkspaceConfig {
  return defineProject({
    ssr: { resolve: { conditions: ["@blk/source", ...defaultServerConditions] } },
    test: {
      name,
      environment: "node",
      tags: BLK_TAGS,
      include: ["test/**/*.test.ts"],
      benchmark: { include: ["bench/**/*.bench.ts"] },
      ...test,
    },
  });
}
