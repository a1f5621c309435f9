import { expect, it } from "vitest";
import {
  ManualClock,
  RateLimit,
  ThrottleConfig,
  ThrottleGroup,
  ThrottleGroupProperties,
} from "../src/index.ts";

it("README example", async () => {
  const MiB = 1024 * 1024;
  const clock = new ManualClock(); // use the default systemClock in real code

  // A throttle group as `--object throttle-group,id=tg0,x-bps-total=1048576` would create it.
  const props = new ThrottleGroupProperties();
  props.setAll({ id: "tg0", "x-bps-total": MiB });
  const group = new ThrottleGroup({ name: "tg0", config: props.complete(), clock });

  // Two members (e.g. two throttle filter nodes) share the 1 MiB/s.
  const a = group.join();
  const b = group.join();
  await a.intercept(4 * MiB, false); // admitted at once and accounted: the next request pays
  let admittedAt = -1;
  const next = b.intercept(4096, false).then(() => {
    admittedAt = clock.now();
  });
  clock.advance(3_900_000_000); // (4 MiB − 0.1 MiB) / 1 MiB/s
  await next;
  expect(admittedAt).toBeGreaterThan(3_899_000_000);

  // qom-set tg0 limits: merged, validated with QEMU's messages, and the debt is forgotten.
  expect(() => props.set("limits", { "bps-read": MiB })).toThrow(
    "bps/iops/max total values and read/write values cannot be used at the same time",
  );
  props.set("limits", { "iops-total": 100 });
  group.setConfig(props.config);
  expect(ThrottleConfig.fromLimits({ "bps-total": MiB, "iops-total": 100 }).equals(group.config)).toBe(true);

  // Job speed: 1 MiB/s in 100 ms slices.
  const limit = new RateLimit({ speed: MiB });
  expect(limit.calculateDelay(65536, 0)).toBe(0);
  expect(limit.calculateDelay(65536, 0)).toBe(125000715); // sleep ~125 ms before the next chunk
});
