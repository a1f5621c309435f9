/** blkd: qemu-storage-daemon's command line, a QMP monitor with the block command set, and NBD exports; createDaemon() for embedding. */
export {
  COMMAND_GROUPS,
  type CommandFactory,
  type CommandGroup,
  LazyCommandRegistry,
  type LazyCommandRegistryOptions,
} from "./command-groups.ts";
export type { DaemonObject, DaemonState, ExportEntry } from "./context.ts";
export { createDaemon, Daemon, type DaemonOptions } from "./daemon.ts";
export { DaemonDrivers } from "./driver-table.ts";
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
export { PidFile, PidFileError } from "./pidfile.ts";
export { BLKD_VERSION, QMP_VERSION } from "./version.ts";
