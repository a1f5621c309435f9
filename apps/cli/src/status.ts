/**
 * Block status for the commands: over the backing chain when there is one, else the node's own status,
 * which comes back in one pass for a whole range (asking the chain walk for a long range of a single
 * image returns one extent per call and costs a full scan each time).
 */
import type { BlockNode, BlockStatusExtent } from "@blk/core";

/** True when reads of `node` can fall through to a backing node (looking through filters). */
export function hasChain(node: BlockNode): boolean {
  let n: BlockNode | undefined = node;
  for (let i = 0; n !== undefined && i < 64; i++) {
    if (n.backing !== undefined) return true;
    n = n.driver.kind === "filter" ? n.filtered : undefined;
  }
  return false;
}

/** Extents of `[offset, offset+bytes)` with `depth` set, as `blockStatusAbove` reports them. */
export async function statusOf(node: BlockNode, offset: number, bytes: number): Promise<BlockStatusExtent[]> {
  if (hasChain(node)) return node.blockStatusAbove(offset, bytes);
  const got = await node.blockStatus(offset, bytes);
  return got.map((e) => ({ ...e, depth: 0 }));
}

/** Largest range asked at once. */
const WINDOW = 256 << 20;

/** Walks the extents of a node forwards, fetching them a window at a time. */
export class ExtentCursor {
  readonly #node: BlockNode;
  readonly #end: number;
  #cache: BlockStatusExtent[] = [];
  #i = 0;

  /** Extents of `node` up to `end`. */
  constructor(node: BlockNode, end: number) {
    this.#node = node;
    this.#end = end;
  }

  /** The extent at `pos`, starting at `pos` (clipped). */
  async at(pos: number): Promise<BlockStatusExtent> {
    for (let pass = 0; pass < 2; pass++) {
      while (this.#i < this.#cache.length) {
        const e = this.#cache[this.#i];
        if (e === undefined) break;
        if (e.offset + e.length <= pos) {
          this.#i++;
          continue;
        }
        if (e.offset > pos) break;
        const skip = pos - e.offset;
        const out: BlockStatusExtent = { ...e, offset: pos, length: e.length - skip };
        if (e.hostOffset !== undefined) out.hostOffset = e.hostOffset + skip;
        return out;
      }
      this.#cache = await statusOf(this.#node, pos, Math.min(this.#end - pos, WINDOW));
      this.#i = 0;
    }
    throw new Error(`No block status at ${pos}`);
  }
}
