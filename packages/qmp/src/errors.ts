/**
 * QMP error classes as QEMU 7.2 sends them in `{"error": {"class": …, "desc": …}}`.
 * Everything but the first three is kept only for compatibility; new errors are GenericError.
 */
export const QMP_ERROR_CLASSES = [
  "GenericError",
  "CommandNotFound",
  "DeviceNotActive",
  "DeviceNotFound",
  "KVMMissingCap",
] as const;

/** One of QEMU's QMP error classes. */
export type QmpErrorClass = (typeof QMP_ERROR_CLASSES)[number];

const kQmpError = Symbol.for("@blk/qmp-error");

/**
 * An error answer to a QMP command: thrown by command handlers and by validation (the server turns it
 * into `{"error": {"class", "desc"}}`), and rejected by `QmpClient.execute` when the peer answers with one.
 * @example
 * throw new QmpError("DeviceNotActive", "No active block job with id 'j0'");
 */
export class QmpError extends Error {
  override readonly name = "QmpError";
  readonly errorClass: QmpErrorClass;
  /** The `desc` QEMU sends; the same as `message`. */
  readonly desc: string;
  constructor(errorClass: QmpErrorClass, desc: string, options?: { cause?: unknown }) {
    super(desc, options?.cause === undefined ? undefined : { cause: options.cause });
    this.errorClass = errorClass;
    this.desc = desc;
    Object.defineProperty(this, kQmpError, { value: true });
  }
  static override [Symbol.hasInstance](v: unknown): boolean {
    return typeof v === "object" && v !== null && kQmpError in v;
  }
  /** The wire form, `{class, desc}`. */
  toJSON(): { class: QmpErrorClass; desc: string } {
    return { class: this.errorClass, desc: this.desc };
  }
}

/** True when `v` is a {@link QmpError} (of `errorClass`, when given). */
export const isQmpError = (v: unknown, errorClass?: QmpErrorClass): v is QmpError =>
  v instanceof QmpError && (errorClass === undefined || v.errorClass === errorClass);

/**
 * The contract between the command registry and the QAPI toolkit: anything that turns untrusted JSON into a
 * typed value, with QEMU's wording on failure (a {@link QmpError} of class GenericError).
 */
export interface ArgsSchema<T> {
  /** Validates `value` and returns it typed, with defaults applied. @throws {QmpError} GenericError */
  parse(value: unknown): T;
}
