/**
 * `@blk/hbitmap`: QEMU-compatible hierarchical dirty bitmap (HBitmap): ranges, count, iterators,
 * serialization, merge.
 */
export type { HBitmapErrorCode } from "./errors.ts";
export { HBITMAP_ERROR_CODES, HBitmapError, isHBitmapError } from "./errors.ts";
export type { HBitmapArea, HBitmapStatus } from "./hbitmap.ts";
export {
  HBITMAP_MAX_BITS,
  HBITMAP_MAX_SERIALIZABLE_GRANULARITY,
  HBitmap,
  HBitmapIter,
} from "./hbitmap.ts";
