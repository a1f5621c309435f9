/** blkd: qemu-storage-daemon's command line, a QMP monitor with the block command set, and NBD exports; createDaemon() for embedding. */
export {};
