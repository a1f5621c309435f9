/** QEMU-compatible leaky-bucket I/O throttling: six limits with bursts, throttle groups, job rate limits. */
export { type Clock, ManualClock, systemClock, type TimerHandle } from "./clock.ts";
export {
  BUCKET_NAMES,
  BUCKETS_COUNT,
  type BucketConfig,
  BucketType,
  THROTTLE_BURST_LENGTH_MAX,
  THROTTLE_LIMITS_KEYS,
  THROTTLE_VALUE_MAX,
  ThrottleConfig,
  type ThrottleConfigInit,
  type ThrottleLimits,
} from "./config.ts";
export { isThrottleError, ThrottleError, type ThrottleErrorCode } from "./errors.ts";
export { ThrottleGroup, type ThrottleGroupMember, type ThrottleGroupOptions } from "./group.ts";
export { THROTTLE_GROUP_X_PROPERTIES, ThrottleGroupProperties } from "./properties.ts";
export { RATELIMIT_DEFAULT_SLICE_NS, RateLimit, type RateLimitOptions } from "./ratelimit.ts";
export { type ThrottleLevels, ThrottleState } from "./state.ts";
