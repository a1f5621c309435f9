/** Block drivers for blk: file, raw, qcow2, nbd, throttle, null-co, blkdebug, and QEMU's gluster URL parser. */

export * from "./drivers.ts";
export * from "./gluster/index.ts";
