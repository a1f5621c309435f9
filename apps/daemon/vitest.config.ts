import { blkProject } from "../../tooling/vitest/project.ts";

export default blkProject("@blk/daemon");
