/** Block jobs for blk: QEMU's job state machine, mirror, backup, commit and stream. */
export {};
