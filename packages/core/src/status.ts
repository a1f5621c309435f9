/**
 * Views of block-status extents for their consumers: `qemu-img map --output=json` entries, NBD
 * `base:allocation` flags and `qemu:allocation-depth` values.
 */
import type { BlockStatusExtent } from "./driver.ts";

/** One `qemu-img map --output=json` entry, keys in qemu-img's order. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  /** Host offset, only for data whose location is known. */
  offset?: number;
}

/** NBD `base:allocation` flag: reads may not come from allocated storage. */
export const NBD_STATE_HOLE = 1;
/** NBD `base:allocation` flag: reads return zeroes. */
export const NBD_STATE_ZERO = 2;

/** The `qemu-img map` JSON entry of an extent from {@link BlockNode.blockStatusAbove}. */
export function toMapEntry(e: BlockStatusExtent): MapEntry {
  const out: MapEntry = {
    start: e.offset,
    length: e.length,
    depth: e.depth ?? 0,
    present: e.allocated,
    zero: e.zero,
    data: e.data,
  };
  if (e.data && e.hostOffset !== undefined) out.offset = e.hostOffset;
  return out;
}

/**
 * `qemu-img map` JSON entries: extents mapped with {@link toMapEntry}, neighbours merged when every field
 * matches and host offsets (if any) are contiguous.
 */
export function toMapEntries(extents: readonly BlockStatusExtent[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const e of extents) {
    const m = toMapEntry(e);
    const last = out.at(-1);
    if (
      last !== undefined &&
      last.start + last.length === m.start &&
      last.depth === m.depth &&
      last.present === m.present &&
      last.zero === m.zero &&
      last.data === m.data &&
      (last.offset === undefined) === (m.offset === undefined) &&
      (last.offset === undefined || last.offset + last.length === m.offset)
    ) {
      last.length += m.length;
    } else {
      out.push(m);
    }
  }
  return out;
}

/** NBD `base:allocation` flags of an extent (`HOLE` unless data, `ZERO` when it reads as zeroes). */
export function nbdAllocationFlags(e: BlockStatusExtent): number {
  return (e.data ? 0 : NBD_STATE_HOLE) | (e.zero ? NBD_STATE_ZERO : 0);
}

/** NBD `qemu:allocation-depth` of an extent from `blockStatusAbove`: 0 unallocated, 1 top layer, 2 first backing… */
export function allocationDepth(e: BlockStatusExtent): number {
  return e.allocated ? (e.depth ?? 0) + 1 : 0;
}
