/**
 * The `commit_top` filter (QEMU 7.2 `block/commit.c`, format name `commit_top`, child `backing`):
 * inserted above the intermediate commit's top node, it takes over the top's parents (the overlay's
 * backing link) and forwards everything to the top. It takes no permission on the top and shares all, so
 * the job may write the base below while the overlay keeps reading through the chain. Removed at the end:
 * on success its parents move to the base, otherwise back to the top. See `spec/jobs.md` §4.2.
 */
import { BlkError, type BlockDriver, FilterDriverState, type OpenContext, PERM_ALL } from "@blk/core";

/**
 * The `commit_top` filter driver.
 * @example
 * const ct = await graph.openFilterAbove(commitTopDriver, {}, mid, { childName: "backing" });
 */
export const commitTopDriver: BlockDriver<Record<string, never>> = {
  format: "commit_top",
  kind: "filter",
  async open(_options: Record<string, never>, ctx: OpenContext): Promise<FilterDriverState> {
    const child = ctx.children.get("backing");
    if (child === undefined) throw new BlkError("EINVAL", "Parameter 'backing' is missing");
    return new FilterDriverState(child);
  },
  childPerm(): { perm: number; shared: number } {
    return { perm: 0, shared: PERM_ALL };
  },
};
