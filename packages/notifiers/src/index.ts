/** Ordered async before-write notifier lists and byte-range request tracking (serialising requests, drain). */
export { isNotifierError, NotifierError, type NotifierErrorCode } from "./errors.ts";
export { type Notifier, NotifierList } from "./notifier-list.ts";
export { type BeginOptions, RequestTracker, type TrackedRequest } from "./request-tracker.ts";
