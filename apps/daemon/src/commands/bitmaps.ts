/**
 * Dirty bitmap commands: `block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge` and
 * `x-debug-block-dirty-bitmap-sha256`, with QEMU's lookups, checks and messages (spec/qmp.md §3.4),
 * over core's {@link DirtyBitmap}.
 */
import type { BlockNode, DirtyBitmap } from "@blk/core";
import { BlockDirtyBitmap, BlockDirtyBitmapOrStr, type CommandDefinition, defineCommand, q } from "@blk/qmp";
import type { DaemonState } from "../context.ts";
import { generic, qmpErrors } from "../errors.ts";
import { lookupNode } from "./lookup.ts";

/** QEMU's `block_dirty_bitmap_lookup`: `Node 'X' not found`, `Dirty bitmap 'X' not found`. */
function lookupBitmap(
  state: DaemonState,
  node: string,
  name: string,
): { node: BlockNode; bitmap: DirtyBitmap } {
  const bs = state.graph.find(node);
  if (bs === undefined) throw generic(`Node '${node}' not found`);
  const bitmap = bs.getBitmap(name);
  if (bitmap === undefined) throw generic(`Dirty bitmap '${name}' not found`);
  return { node: bs, bitmap };
}

const AddArgs = q.object({
  node: q.str(),
  name: q.str(),
  granularity: q.optional(q.uint32()),
  persistent: q.optional(q.bool()),
  disabled: q.optional(q.bool()),
});
const MergeArgs = q.object({
  node: q.str(),
  target: q.str(),
  bitmaps: q.list(BlockDirtyBitmapOrStr),
});

/** The bitmap commands. */
export function bitmapCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  const simple = (name: string, fn: (b: DirtyBitmap) => void | Promise<void>) =>
    defineCommand({
      name,
      args: BlockDirtyBitmap,
      handler: async (args) => {
        const { bitmap } = lookupBitmap(state, args.node, args.name);
        await qmpErrors(() => fn(bitmap));
        return {};
      },
    });
  return [
    defineCommand({
      name: "block-dirty-bitmap-add",
      args: AddArgs,
      handler: async (args) => {
        if (args.name === "") throw generic("Bitmap name cannot be empty");
        const node = lookupNode(state, args.node, args.node);
        await qmpErrors(() =>
          node.createBitmap({
            name: args.name,
            ...(args.granularity === undefined ? {} : { granularity: args.granularity }),
            persistent: args.persistent ?? false,
            disabled: args.disabled ?? false,
          }),
        );
        return {};
      },
    }),
    simple("block-dirty-bitmap-remove", (b) => b.remove()),
    simple("block-dirty-bitmap-clear", (b) => {
      b.clear();
    }),
    simple("block-dirty-bitmap-enable", (b) => b.enable()),
    simple("block-dirty-bitmap-disable", (b) => b.disable()),
    defineCommand({
      name: "block-dirty-bitmap-merge",
      args: MergeArgs,
      handler: async (args) => {
        const { bitmap: target } = lookupBitmap(state, args.node, args.target);
        const sources = args.bitmaps.map((src) =>
          typeof src === "string"
            ? lookupBitmap(state, args.node, src).bitmap
            : lookupBitmap(state, src.node, src.name).bitmap,
        );
        await qmpErrors(() => {
          target.mergeAll(sources);
        });
        return {};
      },
    }),
    defineCommand({
      name: "x-debug-block-dirty-bitmap-sha256",
      args: BlockDirtyBitmap,
      handler: (args) => ({ sha256: lookupBitmap(state, args.node, args.name).bitmap.sha256() }),
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
