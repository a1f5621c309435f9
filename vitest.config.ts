import { defineConfig } from "vitest/config";
import { BLK_TAGS } from "./tooling/vitest/project.ts";

export default defineConfig({
  test: {
    projects: ["packages/*", "apps/*", "tests/*"],
    tags: BLK_TAGS,
    coverage: { provider: "v8", include: ["packages/*/src/**", "apps/*/src/**"] },
    restoreMocks: true,
  },
});
