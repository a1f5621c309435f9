/** Node lookups with QEMU's messages. */
import type { BlockNode } from "@blk/core";
import type { DaemonState } from "../context.ts";
import { generic } from "../errors.ts";

/**
 * QEMU's `bdrv_lookup_bs(device, node_name)`: the storage daemon has no named BlockBackends, so only
 * node names match.
 * @throws {QmpError} `Cannot find device='D' nor node-name='N'`
 */
export function lookupNode(
  state: DaemonState,
  device: string | undefined,
  nodeName: string | undefined,
): BlockNode {
  const node = nodeName === undefined ? undefined : state.graph.find(nodeName);
  if (node !== undefined) return node;
  throw generic(`Cannot find device='${device ?? ""}' nor node-name='${nodeName ?? ""}'`);
}
