/**
 * A pass-through filter state: every request goes to the filtered child through its edge. Filter
 * drivers (`mirror_top`, `copy-before-write`, `throttle`, …) extend it and override what they change.
 */
import {
  type BlockDriver,
  BlockDriverBase,
  type BlockDriverInfo,
  type OpenContext,
  type TruncateFlags,
  type WriteFlags,
  type ZeroFlags,
} from "./driver.ts";
import { BlkError } from "./errors.ts";
import type { Edge } from "./graph.ts";

/**
 * Forwards reads, writes, zero-writes, discards, truncates and length to `child`. Flushes need nothing:
 * the node flushes its children itself. Block status is not overridden, so the node reports the filtered
 * child's status.
 * @example
 * class CountingFilter extends FilterDriverState {
 *   writes = 0;
 *   protected override _write(o: number, d: Uint8Array, f: WriteFlags) { this.writes++; return super._write(o, d, f); }
 * }
 */
export class FilterDriverState extends BlockDriverBase {
  /** The edge to the filtered child. */
  readonly child: Edge;

  constructor(child: Edge) {
    super({ requestAlignment: 1, maxTransfer: 0 });
    this.child = child;
  }

  protected override supportsFua(): boolean {
    return true;
  }
  protected override _read(offset: number, buf: Uint8Array): Promise<void> {
    return this.child.readInto(offset, buf);
  }
  protected override _write(offset: number, data: Uint8Array, flags: WriteFlags): Promise<void> {
    return this.child.write(offset, data, { fua: flags.fua ?? false });
  }
  protected override _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    return this.child.writeZeroes(offset, bytes, flags);
  }
  protected override _discard(offset: number, bytes: number): Promise<void> {
    return this.child.discard(offset, bytes);
  }
  protected override _truncate(length: number, flags: TruncateFlags): Promise<void> {
    return this.child.truncate(length, flags);
  }
  protected override async _getLength(): Promise<number> {
    return this.child.length;
  }
  protected override async _info(): Promise<BlockDriverInfo> {
    return this.child.child.info();
  }
}

/**
 * A pass-through filter driver with the given format name (default `x-blk-passthrough`), its only child
 * named `file` (or `backing` for `mirror_top`-style filters).
 * @example
 * const top = await graph.openFilterAbove(filterDriver("mirror_top"), {}, src, { childName: "backing" });
 */
export function filterDriver(format = "x-blk-passthrough"): BlockDriver<Record<string, never>> {
  return {
    format,
    kind: "filter",
    async open(_options: Record<string, never>, ctx: OpenContext): Promise<FilterDriverState> {
      const child = ctx.children.get("file") ?? ctx.children.get("backing");
      if (child === undefined) throw new BlkError("EINVAL", "Parameter 'file' is missing");
      return new FilterDriverState(child);
    },
  };
}
