/** What the command handlers share: the daemon's graph, jobs, objects, NBD server and exports. */
import type { BlockGraph } from "@blk/core";
import type { NbdExport, NbdServer } from "@blk/drivers/nbd";
import type { JobManager } from "@blk/jobs";
import type { ThrottleGroup, ThrottleGroupProperties } from "@blk/throttle";
import type { DaemonDrivers } from "./driver-table.ts";
import type { Logger } from "./log.ts";

/** A user-created QOM object (`--object`, `object-add`). blkd implements `throttle-group`. */
export interface DaemonObject {
  readonly id: string;
  readonly type: "throttle-group";
  readonly props: ThrottleGroupProperties;
  readonly group: ThrottleGroup;
}

/** A block export (`--export`, `block-export-add`). */
export interface ExportEntry {
  readonly id: string;
  readonly type: "nbd";
  readonly nodeName: string;
  readonly name: string;
  readonly nbd: NbdExport;
  shuttingDown: boolean;
}

/** The state behind the QMP commands (implemented by the daemon). */
export interface DaemonState {
  readonly graph: BlockGraph;
  readonly jobs: JobManager;
  /** The block drivers, loaded on demand (see {@link DaemonDrivers}). */
  readonly drivers: DaemonDrivers;
  readonly objects: Map<string, DaemonObject>;
  readonly throttleGroups: Map<string, ThrottleGroup>;
  readonly exports: Map<string, ExportEntry>;
  readonly log: Logger;
  /** The running NBD server (`nbd-server-start`), if any. */
  nbd: NbdServer | undefined;
  /** Broadcasts a QMP event to every negotiated monitor session. */
  emit(event: string, data?: Record<string, unknown>): void;
  /** Asks the daemon to shut down (after the current command's answer). */
  requestShutdown(reason: string): void;
}
