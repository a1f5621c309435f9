/** blk-img: qemu-img's syntax, exit codes and JSON output over the blk block layer. */
export { type CliIo, COMMANDS, main } from "./main.ts";
export { humanSize, parseSize } from "./size.ts";
