-- Gives back the given ids of one claim set that are still in it, to the head of the
-- queue, oldest first (ARGV[1] "1"; otherwise in any order), as the dead-worker recovery
-- does. Each id leaves the claim set before it is pushed, so it is pushed once, however
-- many give it back at the same time.
-- KEYS: claim set, queue list, queue bodies; ARGV: "1" to keep order, the ids
-- Returns the Dramatiq message ids (for the log) of what went back, "?" where undecodable.
local found = {}
for i = 2, #ARGV do
    local id = ARGV[i]
    if redis.call("srem", KEYS[1], id) == 1 then
        local body = redis.call("hget", KEYS[3], id)
        if body then
            local sent, message_id = math.huge, "?"
            local ok, message = pcall(cjson.decode, body)
            if ok and type(message) == "table" then
                if type(message["message_timestamp"]) == "number" then
                    sent = message["message_timestamp"]
                end
                if type(message["message_id"]) == "string" then
                    message_id = message["message_id"]
                end
            end
            if ARGV[1] ~= "1" then
                sent = 0
            end
            found[#found + 1] = {id, sent, message_id}
        end
    end
end
table.sort(found, function(a, b) return a[2] > b[2] end)
local moved = {}
for _, entry in ipairs(found) do
    redis.call("lpush", KEYS[2], entry[1])
    moved[#moved + 1] = entry[3]
end
return moved
