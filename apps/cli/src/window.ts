/**
 * A filter node that shows `[base, base+length)` of its child as a whole device and can drop zero writes:
 * `convert` writes each source through one, at the source's place in the target, and drops zero writes
 * when the target is known to read as zeroes (a fresh image, `--target-is-zero`). With `-C` it passes copy
 * offload down to the target's file. (The `-S` search for zero runs in data is `sparse.ts`, run by the
 * copy engine before each in-order write.)
 */
import {
  type BlockDriver,
  type BlockGraph,
  type BlockNode,
  backendParent,
  CHILD_ROLE,
  type CopyRangeSource,
  type Edge,
  FilterDriverState,
  PERM,
  PERM_ALL,
  type WriteFlags,
  type ZeroFlags,
} from "@blk/core";
import { RawState } from "@blk/drivers";

/** Options of the window filter. */
export interface WindowOptions {
  base: number;
  length: number;
  /** Zero writes do nothing (the target already reads as zeroes). */
  dropZeroes: boolean;
}

/**
 * Where copy offload reaches `node`'s data: a `raw` node without an offset or size window, which no
 * probing guards, holds its file's bytes as they are, so offload goes to its `file` child (through the
 * raw node's edge) until the raw driver passes copy offload on itself; any other node is used as it is.
 */
export function offloadEnd(node: BlockNode): { node: BlockNode; via?: Edge } {
  const file = node.children.get("file");
  const state = node.closed ? undefined : node.state;
  if (
    state instanceof RawState &&
    state.probedGuard === undefined &&
    file !== undefined &&
    (file.role & CHILD_ROLE.FILTERED) !== 0
  ) {
    return { node: file.child, via: file };
  }
  return { node };
}

class WindowState extends FilterDriverState {
  readonly #o: WindowOptions;
  constructor(child: Edge, o: WindowOptions) {
    super(child);
    this.#o = o;
  }
  protected override _read(offset: number, buf: Uint8Array): Promise<void> {
    return this.child.readInto(offset + this.#o.base, buf);
  }
  protected override async _write(offset: number, data: Uint8Array, flags: WriteFlags): Promise<void> {
    await this.child.write(offset + this.#o.base, data, { fua: flags.fua ?? false });
  }
  protected override async _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    if (this.#o.dropZeroes) return;
    await this.child.writeZeroes(offset + this.#o.base, bytes, flags);
  }
  protected override async _discard(offset: number, bytes: number): Promise<void> {
    if (this.#o.dropZeroes) return;
    await this.child.discard(offset + this.#o.base, bytes);
  }
  protected override async _getLength(): Promise<number> {
    return this.#o.length;
  }

  /**
   * Copy offload into the child at the window's place. The data is not looked at, so no zero runs are
   * found in it (as with qemu-img -C); when offload is refused, the data is written and searched as usual.
   */
  copyRangeTo(src: CopyRangeSource, offset: number, bytes: number): Promise<void> {
    return this.request(async () => {
      const end = offloadEnd(this.child.child);
      const via = end.via ?? this.child;
      await end.node.copyRangeTo(src, offset + this.#o.base, bytes, { via });
    });
  }
}

/** The window filter driver (`x-blk-window`). */
const windowDriver: BlockDriver<WindowOptions> = {
  format: "x-blk-window",
  kind: "filter",
  async open(options: WindowOptions, ctx): Promise<WindowState> {
    const child = ctx.children.get("file");
    if (child === undefined) throw new Error("x-blk-window needs a file child");
    return new WindowState(child, options);
  },
};

/** A window over `target` with a writing user edge on it; `close()` removes both. */
export async function openWindow(
  graph: BlockGraph,
  target: BlockNode,
  options: WindowOptions,
): Promise<{ edge: Edge; close(): Promise<void> }> {
  const node = await graph.open(windowDriver, options, {
    children: { file: { node: target, role: CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY } },
  });
  const edge = graph.attach(backendParent(), node, {
    name: "root",
    perm: PERM.CONSISTENT_READ | PERM.WRITE,
    shared: PERM_ALL,
  });
  return {
    edge,
    async close(): Promise<void> {
      edge.detach();
      await graph.delete(node, { force: true });
    },
  };
}
