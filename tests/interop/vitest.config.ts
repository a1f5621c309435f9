import { blkProject } from "../../tooling/vitest/project.ts";

export default blkProject("interop", { testTimeout: 60_000, hookTimeout: 60_000 });
