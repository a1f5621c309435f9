/** Structured logs: one JSON object per line (`time`, `level`, `msg`, and fields), to stderr by default. */

/** Severity of a log record. */
export type LogLevel = "debug" | "info" | "warn" | "error";

/** One log record. */
export interface LogRecord {
  time: string;
  level: LogLevel;
  msg: string;
  [field: string]: unknown;
}

/** Where log records go. */
export type LogSink = (record: LogRecord) => void;

/** A small structured logger. */
export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
}

const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/**
 * A logger writing to `sink` the records at or above `level`.
 * @example
 * const log = createLogger(jsonLinesTo(process.stderr), "info");
 * log.info("nbd server started", { path: "/tmp/nbd.sock" });
 */
export function createLogger(sink: LogSink | undefined, level: LogLevel = "info"): Logger {
  const at =
    (lvl: LogLevel) =>
    (msg: string, fields: Record<string, unknown> = {}): void => {
      if (sink === undefined || ORDER[lvl] < ORDER[level]) return;
      try {
        sink({ time: new Date().toISOString(), level: lvl, msg, ...fields });
      } catch {
        // a failing sink must never take the daemon down
      }
    };
  return { debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") };
}

/** A sink writing JSON lines to a stream (stderr for the daemon). */
export function jsonLinesTo(stream: { write(chunk: string): unknown }): LogSink {
  return (record) => {
    stream.write(`${JSON.stringify(record)}\n`);
  };
}
