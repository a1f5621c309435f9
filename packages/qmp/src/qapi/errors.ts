/**
 * QEMU's validation messages (the `desc` of a GenericError), as its QObject and keyval input visitors word them.
 * Every function returns the exact text; {@link qapiError} wraps it in a {@link QmpError}.
 */
import { QmpError } from "../errors.ts";

/** A {@link QmpError} of class GenericError with `desc`. */
export const qapiError = (desc: string, cause?: unknown): QmpError =>
  new QmpError("GenericError", desc, cause === undefined ? undefined : { cause });

/** QEMU's exact wording for each schema-validation failure. */
export const QAPI_MESSAGES: {
  readonly missing: (name: string) => string;
  readonly unexpected: (name: string) => string;
  readonly invalidType: (name: string, expected: string) => string;
  readonly expects: (name: string, what: string) => string;
  readonly badEnumValue: (name: string, value: string) => string;
  readonly keyvalNotScalar: (name: string) => string;
} = {
  /** `Parameter 'X' is missing` (full dotted name). */
  missing: (name) => `Parameter '${name}' is missing`,
  /** `Parameter 'X' is unexpected` (full dotted name). */
  unexpected: (name) => `Parameter '${name}' is unexpected`,
  /** `Invalid parameter type for 'X', expected: T`. */
  invalidType: (name, expected) => `Invalid parameter type for '${name}', expected: ${expected}`,
  /** `Parameter 'X' expects W` (QEMU's QERR_INVALID_PARAMETER_VALUE). */
  expects: (name, what) => `Parameter '${name}' expects ${what}`,
  /** `Parameter 'X' does not accept value 'V'` (X is the member name only, `null` inside a list). */
  badEnumValue: (name, value) => `Parameter '${name}' does not accept value '${value}'`,
  /** keyval: a dotted group where a scalar belongs. */
  keyvalNotScalar: (name) => `Parameters '${name}.*' are unexpected`,
};
