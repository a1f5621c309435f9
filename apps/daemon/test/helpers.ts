/** Test helpers: an in-process daemon with a QMP client on a unix socket in a temp dir. */

import { QmpClient, QmpError } from "@blk/qmp";
import { makeTempDir, type TempDir } from "@blk/testkit";
import { createDaemon, type Daemon, type DaemonOptions } from "../src/index.ts";

export interface Session extends AsyncDisposable {
  dir: TempDir;
  daemon: Daemon;
  qmp: QmpClient;
  sock: string;
  /** Runs a command and returns its QMP error (class and desc), failing if it succeeds. */
  error(command: string, args?: Record<string, unknown>): Promise<{ class: string; desc: string }>;
}

export async function startSession(options: DaemonOptions = {}): Promise<Session> {
  const dir = makeTempDir("blkd");
  const daemon = await createDaemon(options);
  const sock = dir.join("qmp.sock");
  await daemon.qmp.listen({ path: sock });
  const qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 10_000 });
  const error = async (command: string, args?: Record<string, unknown>) => {
    try {
      await qmp.execute(command, args);
    } catch (e) {
      if (e instanceof QmpError) return { class: e.errorClass, desc: e.desc };
      throw e;
    }
    throw new Error(`${command} succeeded`);
  };
  const dispose = async (): Promise<void> => {
    await qmp.close();
    await daemon.close();
    await dir.dispose();
  };
  return { dir, daemon, qmp, sock, error, [Symbol.asyncDispose]: dispose };
}

export const generic = (desc: string): { class: string; desc: string } => ({ class: "GenericError", desc });
