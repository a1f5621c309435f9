import { describe, expect, it } from "vitest";
import { generic, startSession } from "./helpers.ts";

describe("throttle-group objects (transcripts §3, §10)", () => {
  it("object-add validation, qom-get/qom-set, throttle nodes, object-del", async () => {
    await using s = await startSession();
    const bad: [Record<string, unknown>, string][] = [
      [
        { "bps-total": 1000000, "bps-read": 1000 },
        "bps/iops/max total values and read/write values cannot be used at the same time",
      ],
      [{ "iops-total": 100, "iops-total-max": 50 }, "bps_max/iops_max cannot be lower than bps/iops"],
      [{ "iops-total-max": 50 }, "bps_max/iops_max require corresponding bps/iops values"],
      [{ "iops-total": 100, "iops-total-max-length": 5 }, "burst length set without burst rate"],
      [{ "iops-size": 4096 }, "iops size requires an iops value to be set"],
      [{ "bps-total": 1000000000000001 }, "bps/iops/max values must be within [0, 1000000000000000]"],
      [{ "bps-total": -1 }, "bps/iops/max values must be within [0, 1000000000000000]"],
      [
        { "iops-total": 100, "iops-total-max": 200, "iops-total-max-length": 0 },
        "the burst length cannot be 0",
      ],
    ];
    for (const [limits, desc] of bad)
      expect(await s.error("object-add", { "qom-type": "throttle-group", id: "bad", limits })).toEqual(
        generic(desc),
      );
    expect(
      await s.error("object-add", { "qom-type": "throttle-group", id: "x2", "x-iops-total": -5 }),
    ).toEqual(generic("Property values cannot be negative"));
    expect(
      await s.error("object-add", {
        "qom-type": "throttle-group",
        id: "x1",
        "x-iops-total-max-length": 4294967296,
      }),
    ).toEqual(generic("x-iops-total-max-length value must be in therange [0, 4294967295]"));
    expect(await s.error("object-add", { "qom-type": "bogus", id: "x" })).toEqual(
      generic("Parameter 'qom-type' does not accept value 'bogus'"),
    );
    expect(await s.error("object-add", { "qom-type": "throttle-group" })).toEqual(
      generic("Parameter 'id' is missing"),
    );

    await s.qmp.execute("object-add", {
      "qom-type": "throttle-group",
      id: "tg0",
      limits: { "iops-total": 100, "iops-total-max": 200, "iops-total-max-length": 5, "bps-total": 10485760 },
    });
    expect(await s.error("object-add", { "qom-type": "throttle-group", id: "tg0", limits: {} })).toEqual(
      generic("attempt to add duplicate property 'tg0' to object (type 'container')"),
    );
    const limits = await s.qmp.execute<Record<string, number>>("qom-get", {
      path: "/objects/tg0",
      property: "limits",
    });
    expect(limits).toMatchObject({
      "bps-total": 10485760,
      "iops-total": 100,
      "iops-total-max": 200,
      "iops-total-max-length": 5,
      "bps-read-max-length": 1,
    });
    expect(Object.keys(limits)).toHaveLength(19);
    expect(
      await s.error("qom-set", { path: "/objects/tg0", property: "limits", value: { "bps-read": 5000 } }),
    ).toEqual(generic("bps/iops/max total values and read/write values cannot be used at the same time"));
    await s.qmp.execute("qom-set", {
      path: "/objects/tg0",
      property: "limits",
      value: { "bps-total": 0, "bps-read": 5000 },
    });
    expect(
      await s.qmp.execute<Record<string, number>>("qom-get", { path: "/objects/tg0", property: "limits" }),
    ).toMatchObject({ "bps-total": 0, "bps-read": 5000, "iops-total": 100 });
    expect(s.daemon.throttleGroups.get("tg0")?.config.toLimits()["bps-read"]).toBe(5000);
    expect(await s.error("qom-set", { path: "/objects/tg0", property: "x-iops-total", value: 5 })).toEqual(
      generic("Property cannot be set after initialization"),
    );
    expect(await s.qmp.execute("qom-get", { path: "/objects/tg0", property: "x-iops-total" })).toBe(100);
    expect(await s.error("qom-get", { path: "/objects/tg0", property: "nosuch" })).toEqual(
      generic("Property 'throttle-group.nosuch' not found"),
    );
    expect(await s.error("qom-get", { path: "/objects/nosuch", property: "limits" })).toEqual({
      class: "DeviceNotFound",
      desc: "Device '/objects/nosuch' not found",
    });
    // QOM paths as QEMU 7.2 resolves them: partial paths, empty components skipped.
    for (const path of ["tg0", "objects/tg0", "/objects//tg0", "//objects/tg0", "/objects/tg0/", "tg0/"])
      expect(await s.qmp.execute("qom-get", { path, property: "x-iops-total" }), path).toBe(100);
    for (const path of ["/tg0", "bjects/tg0", "/objects/../objects/tg0", ""])
      expect(await s.error("qom-get", { path, property: "x-iops-total" }), path).toEqual({
        class: "DeviceNotFound",
        desc: `Device '${path}' not found`,
      });
    expect(await s.qmp.execute("qom-list", { path: "objects" })).toEqual(
      await s.qmp.execute("qom-list", { path: "/objects" }),
    );

    await s.qmp.execute("blockdev-add", { driver: "null-co", "node-name": "a" });
    await s.qmp.execute("blockdev-add", {
      driver: "throttle",
      "node-name": "thr",
      "throttle-group": "tg0",
      file: "a",
    });
    expect(
      await s.error("blockdev-add", {
        driver: "throttle",
        "node-name": "thr2",
        "throttle-group": "nosuch",
        file: "a",
      }),
    ).toEqual(generic("Throttle group 'nosuch' does not exist"));
    expect(await s.error("blockdev-add", { driver: "throttle", "node-name": "thr3", file: "a" })).toEqual(
      generic("Parameter 'throttle-group' is missing"),
    );
    expect(await s.error("object-del", { id: "tg0" })).toEqual(
      generic("object 'tg0' is in use, can not be deleted"),
    );
    await s.qmp.execute("blockdev-del", { "node-name": "thr" });
    await s.qmp.execute("object-del", { id: "tg0" });
    expect(await s.error("object-del", { id: "tg0" })).toEqual(generic("object 'tg0' not found"));
  });

  it("x-* properties and limits given together are merged", async () => {
    await using s = await startSession();
    await s.qmp.execute("object-add", {
      "qom-type": "throttle-group",
      id: "x3",
      "x-iops-total": 5,
      limits: { "bps-total": 7 },
    });
    expect(
      await s.qmp.execute<Record<string, number>>("qom-get", { path: "/objects/x3", property: "limits" }),
    ).toMatchObject({ "iops-total": 5, "bps-total": 7 });
  });
});
