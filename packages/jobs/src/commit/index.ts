/** The intermediate commit job (`block-commit`) and its `commit_top` filter. */
export {
  COMMIT_BUFFER_SIZE,
  CommitJob,
  type CommitJobInit,
  type CommitOptions,
  commit,
} from "./commit.ts";
export { commitTopDriver } from "./commit-top.ts";
