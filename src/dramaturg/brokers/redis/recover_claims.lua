-- Moves the ids of one claim set whose bodies still exist back to the head of the queue,
-- oldest first, and deletes the set. One script, so a claim set is taken whole by one
-- recoverer (this one on another worker, or Dramatiq's maintenance): no id is pushed twice.
-- KEYS: heartbeats, claim set, queue list, queue bodies
-- ARGV: worker id, cutoff (ms: dead while its heartbeat is at or before it), "1" to keep order
-- Returns {-1} if the worker has beaten since it was found dead, else the message ids
-- (Dramatiq's, for the log) of what went back, "?" for a body that does not decode.
local beat = redis.call("zscore", KEYS[1], ARGV[1])
if beat and tonumber(beat) > tonumber(ARGV[2]) then
    return {-1}
end
local found = {}
for _, id in ipairs(redis.call("smembers", KEYS[2])) do
    local body = redis.call("hget", KEYS[4], id)
    if body then
        local sent = math.huge  -- undecodable bodies go behind the others
        local message_id = "?"
        local ok, message = pcall(cjson.decode, body)
        if ok and type(message) == "table" then
            if type(message["message_timestamp"]) == "number" then
                sent = message["message_timestamp"]
            end
            if type(message["message_id"]) == "string" then
                message_id = message["message_id"]
            end
        end
        if ARGV[3] ~= "1" then
            sent = 0
        end
        found[#found + 1] = {id, sent, message_id}
    end
end
-- Newest first: each lpush goes in front of the last, so the oldest ends at the head.
table.sort(found, function(a, b) return a[2] > b[2] end)
local moved = {}
for _, entry in ipairs(found) do
    redis.call("lpush", KEYS[3], entry[1])
    moved[#moved + 1] = entry[3]
end
redis.call("del", KEYS[2])
return moved
