/**
 * The order QEMU created the nodes in, which `query-named-block-nodes` lists newest first: recorded by
 * `blockdev-add` and the snapshot commands (a node reopened in place keeps its place).
 */
import type { BlockNode } from "@blk/core";
import type { DaemonState } from "../context.ts";

type BlockGraphLike = DaemonState["graph"];

/** Nodes in QEMU's creation order, per graph (see {@link recordCreation}). */
const creationOrder = new WeakMap<object, BlockNode[]>();

/**
 * Records the nodes a `blockdev-add` created in the order QEMU would have opened them: a node's `file`
 * (and other non-backing) children first, then the node, then its `backing` chain (QEMU opens the backing
 * after the node; blk must open it before). `query-named-block-nodes` lists nodes newest first by this order.
 */
export function recordCreation(graph: BlockGraphLike, root: BlockNode): void {
  const order = creationOrder.get(graph) ?? [];
  creationOrder.set(graph, order);
  const known = new Set(order);
  const visit = (n: BlockNode): void => {
    if (known.has(n)) return;
    known.add(n);
    for (const [name, e] of n.children) if (name !== "backing") visit(e.child);
    order.push(n);
    const b = n.children.get("backing");
    if (b !== undefined) visit(b.child);
  };
  visit(root);
}

/** The graph's nodes newest first, in QEMU's creation order where blkd knows it. */
export function nodesNewestFirst(graph: BlockGraphLike): BlockNode[] {
  const live = graph.list();
  const order = (creationOrder.get(graph) ?? []).filter((n) => graph.find(n.nodeName) === n);
  creationOrder.set(graph, order);
  const known = new Set(order);
  const others = live.filter((n) => !known.has(n));
  return [...others, ...[...order].reverse()];
}

/** `next` (a reopened `prev`: same name) takes `prev`'s place in the creation order. */
export function replaceInCreationOrder(graph: BlockGraphLike, prev: BlockNode, next: BlockNode): void {
  const order = creationOrder.get(graph);
  const i = order?.indexOf(prev) ?? -1;
  if (order !== undefined && i >= 0) order[i] = next;
}
