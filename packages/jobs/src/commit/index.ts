/** The commit job (`block-commit`): intermediate commit with its `commit_top` filter, and active commit. */
export { ActiveCommitJob, type ActiveCommitJobInit } from "./active-commit.ts";
export {
  COMMIT_BUFFER_SIZE,
  CommitJob,
  type CommitJobInit,
  type CommitOptions,
  commit,
} from "./commit.ts";
export { commitTopDriver } from "./commit-top.ts";
