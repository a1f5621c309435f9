import {
  THROTTLE_BURST_LENGTH_MAX,
  THROTTLE_LIMITS_KEYS,
  ThrottleConfig,
  type ThrottleLimits,
} from "./config.ts";
import { ThrottleError } from "./errors.ts";

/**
 * The unstable individual properties of a `throttle-group` object (`x-iops-total` … `x-iops-size`), in
 * QEMU's order: one per `ThrottleLimits` member, prefixed `x-`.
 */
export const THROTTLE_GROUP_X_PROPERTIES: readonly string[] = THROTTLE_LIMITS_KEYS.map((k) => `x-${k}`);

const X_PROPS = new Set(THROTTLE_GROUP_X_PROPERTIES);
const LIMIT_KEYS = new Set<string>(THROTTLE_LIMITS_KEYS);

/** Reads a QOM integer: a JSON number, or a decimal string from a `key=value` command line. */
function toInt(name: string, value: unknown): number {
  if (typeof value === "string" && /^-?\d+$/.test(value)) return Number(value);
  if (typeof value === "number" && Number.isInteger(value)) return value;
  throw new ThrottleError("EINVAL", `Invalid parameter type for '${name}', expected: integer`);
}

const isPlainObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);

/**
 * The properties of a `throttle-group` QOM object (`qapi/qom.json` `ThrottleGroupProperties`), with QEMU's
 * rules and messages, for the daemon's `object-add`, `--object`, `qom-set` and `qom-get`:
 *
 * - `x-*` (19 integer properties) may only be set before {@link ThrottleGroupProperties.complete}:
 *   later → `Property cannot be set after initialization`; negative → `Property values cannot be negative`;
 *   a `*-max-length` above `UINT_MAX` → `x-…-max-length value must be in therange [0, 4294967295]` (QEMU's
 *   text, missing space included);
 * - `limits` (a `ThrottleLimits` object) may be set at any time: its members are **merged** into the
 *   current configuration; after creation the result is validated and a failure leaves the configuration
 *   unchanged;
 * - `complete()` validates the configuration (QEMU's order and messages) when creation finishes;
 * - `get("limits")` returns all 19 members.
 *
 * Unknown names → `Property 'throttle-group.NAME' not found`. Values that are not integers (or decimal
 * strings, as a command line gives them) → `Invalid parameter type for 'NAME', expected: integer`.
 * @example
 * const props = new ThrottleGroupProperties();
 * props.set("x-bps-total", 10485760);
 * props.set("limits", { "iops-total": 500 });
 * const group = new ThrottleGroup({ name: "tg0", config: props.complete() });
 * props.set("limits", { "iops-total": 1000 }); // qom-set
 * group.setConfig(props.config);
 */
export class ThrottleGroupProperties {
  #cfg: ThrottleConfig;
  #initialized = false;

  /** @param config the initial configuration (default: no limits). */
  constructor(config: ThrottleConfig = new ThrottleConfig()) {
    this.#cfg = config;
  }

  /** The current configuration. */
  get config(): ThrottleConfig {
    return this.#cfg;
  }

  /** True once {@link ThrottleGroupProperties.complete} succeeded. */
  get initialized(): boolean {
    return this.#initialized;
  }

  /**
   * Sets one property.
   * @throws {ThrottleError} EINVAL with QEMU's message (see the class description); ENOENT for an unknown
   * property.
   */
  set(name: string, value: unknown): void {
    if (name === "limits") {
      this.#setLimits(value);
      return;
    }
    if (!X_PROPS.has(name)) {
      throw new ThrottleError("ENOENT", `Property 'throttle-group.${name}' not found`);
    }
    if (this.#initialized) throw new ThrottleError("EINVAL", "Property cannot be set after initialization");
    const v = toInt(name, value);
    if (v < 0) throw new ThrottleError("EINVAL", "Property values cannot be negative");
    if (name.endsWith("-max-length") && v > THROTTLE_BURST_LENGTH_MAX) {
      throw new ThrottleError(
        "EINVAL",
        `${name} value must be in therange [0, ${THROTTLE_BURST_LENGTH_MAX}]`,
      );
    }
    this.#cfg = this.#cfg.merge({ [name.slice(2)]: v });
  }

  /**
   * Sets every property of an `object-add` argument or `--object` option list, in the order given; `qom-type`
   * and `id` are skipped. Does not complete.
   * @throws {ThrottleError} as {@link ThrottleGroupProperties.set}.
   */
  setAll(props: Readonly<Record<string, unknown>>): void {
    for (const [name, value] of Object.entries(props)) {
      if (name === "qom-type" || name === "id") continue;
      this.set(name, value);
    }
  }

  /**
   * Reads one property: `limits` gives all 19 `ThrottleLimits` members; an `x-*` name gives that value.
   * @throws {ThrottleError} ENOENT for an unknown property.
   */
  get(name: string): number | Required<ThrottleLimits> {
    const limits = this.#cfg.toLimits();
    if (name === "limits") return limits;
    if (!X_PROPS.has(name)) {
      throw new ThrottleError("ENOENT", `Property 'throttle-group.${name}' not found`);
    }
    return limits[name.slice(2) as keyof ThrottleLimits];
  }

  /**
   * Finishes creation: validates the configuration (QEMU's order and messages) and returns it. Later `x-*`
   * changes are refused.
   * @throws {ThrottleError} EINVAL with QEMU's message.
   */
  complete(): ThrottleConfig {
    this.#cfg.validate();
    this.#initialized = true;
    return this.#cfg;
  }

  #setLimits(value: unknown): void {
    if (!isPlainObject(value)) {
      throw new ThrottleError("EINVAL", "Invalid parameter type for 'limits', expected: object");
    }
    const limits: Record<string, number> = {};
    for (const [k, v] of Object.entries(value)) {
      if (!LIMIT_KEYS.has(k)) throw new ThrottleError("EINVAL", `Parameter 'limits.${k}' is unexpected`);
      limits[k] = toInt(`limits.${k}`, v);
    }
    const next = this.#cfg.merge(limits);
    if (this.#initialized) next.validate();
    this.#cfg = next;
  }
}
