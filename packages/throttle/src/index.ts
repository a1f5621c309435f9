/** QEMU-compatible leaky-bucket I/O throttling: six limits with bursts, throttle groups, job rate limits. */
export {};
