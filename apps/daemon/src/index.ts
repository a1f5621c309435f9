/** blkd: qemu-storage-daemon's command line, a QMP monitor with the block command set, and NBD exports; createDaemon() for embedding. */
export type { DaemonObject, DaemonState, ExportEntry } from "./context.ts";
export { createDaemon, Daemon, type DaemonOptions } from "./daemon.ts";
export {
  createLogger,
  jsonLinesTo,
  type Logger,
  type LogLevel,
  type LogRecord,
  type LogSink,
} from "./log.ts";
export { helpText, type MainIo, main, versionText } from "./main.ts";
export { OptionHelp, type OptionName } from "./options.ts";
export { BLKD_VERSION, QMP_VERSION } from "./version.ts";
