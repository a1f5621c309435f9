/**
 * `block-set-write-threshold` and the `BLOCK_WRITE_THRESHOLD` event (spec/qmp.md §1.5), over core's
 * {@link BlockNode.setWriteThreshold} / {@link BlockNode.onWriteThreshold}. As in QEMU the threshold is
 * one-shot: the first write or zero-write ending past it emits the event and resets it to 0.
 */
import type { BlockNode } from "@blk/core";
import { type CommandDefinition, defineCommand, q } from "@blk/qmp";
import type { DaemonState } from "../context.ts";
import { generic, qmpErrors } from "../errors.ts";

const SetArgs = q.object({ "node-name": q.str(), "write-threshold": q.uint64() });

/** Nodes whose threshold notifications already reach QMP (one listener per node). */
const listening = new WeakSet<BlockNode>();

/** Forwards `node`'s write-threshold notifications as `BLOCK_WRITE_THRESHOLD` (once per node). */
function watchWriteThreshold(state: DaemonState, node: BlockNode): void {
  if (listening.has(node)) return;
  listening.add(node);
  node.onWriteThreshold((ev) => {
    state.emit("BLOCK_WRITE_THRESHOLD", {
      "node-name": ev["node-name"],
      "amount-exceeded": ev["amount-exceeded"],
      "write-threshold": ev["write-threshold"],
    });
  });
}

/** `block-set-write-threshold`. */
export function writeThresholdCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  return [
    defineCommand({
      name: "block-set-write-threshold",
      args: SetArgs,
      handler: async (args) => {
        const node = state.graph.find(args["node-name"]);
        if (node === undefined) throw generic(`Device '${args["node-name"]}' not found`);
        watchWriteThreshold(state, node);
        await qmpErrors(() => node.setWriteThreshold(args["write-threshold"]));
        return {};
      },
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
