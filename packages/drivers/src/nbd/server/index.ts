/** The NBD server: exports {@link BlockNode}s over unix sockets and TCP. */
export type { NbdConnectionInfo } from "./connection.ts";
export {
  findChainBitmap,
  NBD_MAX_BLOCK_STATUS_EXTENTS,
  NbdExport,
  type NbdExportBitmap,
  type NbdExportOptions,
  type NbdMetaContext,
} from "./export.ts";
export {
  type NbdListenAddress,
  type NbdRemoveExportOptions,
  NbdServer,
  type NbdServerOptions,
} from "./server.ts";
