/**
 * Minimal option validators with QEMU's QAPI wording, for the drivers' `schema.parse` (QMP JSON input).
 * Errors are {@link BlkError} `EINVAL` carrying QEMU's exact message (QMP maps them to GenericError).
 */
import { BlkError } from "@blk/core";

const err = (msg: string): BlkError => new BlkError("EINVAL", msg);

/** The value as a plain object. @throws {BlkError} EINVAL */
export function expectObject(value: unknown, name?: string): Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw err(
      name === undefined
        ? "Invalid parameter type, expected: object"
        : `Invalid parameter type for '${name}', expected: object`,
    );
  }
  return value as Record<string, unknown>;
}

/** A string member (`required`: `Parameter 'X' is missing` when absent). */
export function expectString(o: Record<string, unknown>, key: string, required: true): string;
export function expectString(o: Record<string, unknown>, key: string, required: boolean): string | undefined;
export function expectString(o: Record<string, unknown>, key: string, required: boolean): string | undefined {
  const v = o[key];
  if (v === undefined) {
    if (required) throw err(`Parameter '${key}' is missing`);
    return undefined;
  }
  if (typeof v !== "string") throw err(`Invalid parameter type for '${key}', expected: string`);
  return v;
}

/** A boolean member. */
export function expectBool(o: Record<string, unknown>, key: string): boolean | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== "boolean") throw err(`Invalid parameter type for '${key}', expected: boolean`);
  return v;
}

/** An integer member (`min`: QEMU's unsigned types reject negatives here). */
export function expectInt(
  o: Record<string, unknown>,
  key: string,
  min: number = Number.MIN_SAFE_INTEGER,
): number | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== "number" || !Number.isInteger(v))
    throw err(`Invalid parameter type for '${key}', expected: integer`);
  if (v < min) throw err(`Parameter '${key}' expects a non-negative value`);
  return v;
}

/** An enum member. */
export function expectEnum<T extends string>(
  o: Record<string, unknown>,
  key: string,
  values: readonly T[],
): T | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== "string") throw err(`Invalid parameter type for '${key}', expected: string`);
  if (!(values as readonly string[]).includes(v))
    throw err(`Parameter '${key}' does not accept value '${v}'`);
  return v as T;
}

/** Refuses members not in `known` (`Parameter 'X' is unexpected`), checked after the declared ones. */
export function rejectUnexpected(o: Record<string, unknown>, known: readonly string[]): void {
  for (const k of Object.keys(o)) if (!known.includes(k)) throw err(`Parameter '${k}' is unexpected`);
}
