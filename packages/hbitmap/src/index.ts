/** QEMU-compatible hierarchical dirty bitmap (HBitmap): ranges, count, iterators, serialization, merge. */
export {};
