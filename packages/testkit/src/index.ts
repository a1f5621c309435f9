/**
 * Private test helpers for blk: temp dirs that always clean up, deterministic data with checksums,
 * and real peer programs (qemu-img, qemu-nbd, nbdkit …) spawned with time-outs and guaranteed kill.
 */
export { fill, firstDifference, pattern, patternByte, rng, sha256 } from "./pattern.ts";
export {
  type CheckedRun,
  type CommandRunner,
  commandRunner,
  missingPeers,
  type Peer,
  PeerTimeoutError,
  qemuTools,
  type RunOptions,
  type RunResult,
  run,
  type SpawnPeerOptions,
  spawnPeer,
  waitForPath,
  which,
} from "./spawn.ts";
export { makeTempDir, type TempDir, withTempDir } from "./tmp.ts";
