/** The stream job (`block-stream`), its `copy-on-read` filter and the backing-chain helpers it shares with commit. */
export {
  type BackingFileWriter,
  backingFileWriter,
  nodeFilename,
} from "./chain.ts";
export { type CopyOnReadOptions, CopyOnReadState, copyOnReadDriver } from "./copy-on-read.ts";
export { STREAM_CHUNK, StreamJob, type StreamJobInit, type StreamOptions, stream } from "./stream.ts";
