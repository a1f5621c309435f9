import { describe, expect, it } from "vitest";
import {
  isThrottleError,
  THROTTLE_GROUP_X_PROPERTIES,
  THROTTLE_LIMITS_KEYS,
  ThrottleGroupProperties,
} from "../src/index.ts";

function message(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    expect(isThrottleError(e)).toBe(true);
    return (e as Error).message;
  }
  throw new Error("did not throw");
}

describe("ThrottleGroupProperties (throttle-group QOM object)", () => {
  it("has the 19 x- properties in QEMU's order", () => {
    expect(THROTTLE_GROUP_X_PROPERTIES).toHaveLength(19);
    expect(THROTTLE_GROUP_X_PROPERTIES[0]).toBe("x-iops-total");
    expect(THROTTLE_GROUP_X_PROPERTIES[18]).toBe("x-iops-size");
    expect(THROTTLE_GROUP_X_PROPERTIES).toContain("x-bps-write-max-length");
  });

  it("object-add with x- properties and limits merged, then validated on completion", () => {
    const p = new ThrottleGroupProperties();
    p.setAll({
      "qom-type": "throttle-group",
      id: "tg0",
      "x-bps-total": 10485760,
      limits: { "iops-total": 500 },
    });
    const cfg = p.complete();
    expect(p.initialized).toBe(true);
    expect(cfg.toLimits()).toMatchObject({ "bps-total": 10485760, "iops-total": 500 });
    expect(p.get("x-bps-total")).toBe(10485760);
    expect(p.get("x-bps-total-max-length")).toBe(1);
    const limits = p.get("limits");
    expect(Object.keys(limits)).toEqual(THROTTLE_LIMITS_KEYS);
  });

  it("accepts decimal strings from a key=value command line", () => {
    const p = new ThrottleGroupProperties();
    p.setAll({ id: "tg0", "x-bps-total": "10485760", "x-iops-total": "1000" });
    expect(p.complete().toLimits()).toMatchObject({ "bps-total": 10485760, "iops-total": 1000 });
  });

  it("x- properties: QEMU's messages", () => {
    const p = new ThrottleGroupProperties();
    expect(message(() => p.set("x-iops-total", -1))).toBe("Property values cannot be negative");
    expect(message(() => p.set("x-iops-total-max-length", 4294967296))).toBe(
      "x-iops-total-max-length value must be in therange [0, 4294967295]",
    );
    expect(message(() => p.set("x-bps-read", 1.5))).toBe(
      "Invalid parameter type for 'x-bps-read', expected: integer",
    );
    expect(message(() => p.set("x-nope", 1))).toBe("Property 'throttle-group.x-nope' not found");
    p.set("x-iops-total", 10);
    p.complete();
    expect(message(() => p.set("x-iops-total", 5))).toBe("Property cannot be set after initialization");
    expect(message(() => p.set("x-iops-total", -5))).toBe("Property cannot be set after initialization");
  });

  it("completion validates in QEMU's order", () => {
    const p = new ThrottleGroupProperties();
    p.setAll({ "x-bps-total": 1, limits: { "bps-read": 1 } });
    expect(message(() => p.complete())).toBe(
      "bps/iops/max total values and read/write values cannot be used at the same time",
    );
    expect(p.initialized).toBe(false);
  });

  it("qom-set limits after creation: merged, validated, unchanged on failure", () => {
    const p = new ThrottleGroupProperties();
    p.set("limits", { "iops-total": 100, "iops-total-max": 200 });
    p.complete();
    p.set("limits", { "iops-total-max-length": 5 });
    expect(p.config.toLimits()).toMatchObject({
      "iops-total": 100,
      "iops-total-max": 200,
      "iops-total-max-length": 5,
    });
    expect(message(() => p.set("limits", { "iops-total": 300 }))).toBe(
      "bps_max/iops_max cannot be lower than bps/iops",
    );
    expect(p.config.toLimits()["iops-total"]).toBe(100);
    expect(message(() => p.set("limits", { "bps-total-max-length": 4294967296 }))).toBe(
      "bps-total-max-length value must be in the range [0, 4294967295]",
    );
    // QEMU does not range-check iops-size: -1 is read as a huge unsigned size (every request is 1 op)
    p.set("limits", { "iops-size": -1 });
    expect(p.get("x-iops-size")).toBe(-1);
  });

  it("limits: rejects unknown members and non-integers", () => {
    const p = new ThrottleGroupProperties();
    expect(message(() => p.set("limits", { "bps-totl": 1 }))).toBe(
      "Parameter 'limits.bps-totl' is unexpected",
    );
    expect(message(() => p.set("limits", { "bps-total": "x" }))).toBe(
      "Invalid parameter type for 'limits.bps-total', expected: integer",
    );
    expect(message(() => p.set("limits", 5))).toBe("Invalid parameter type for 'limits', expected: object");
  });
});
