/** blk-img: qemu-img's syntax, exit codes and JSON output over the blk block layer. */
export {};
