-- The database role the router serves as: it owns nothing, reads and appends to the event
-- logs, and can never change or delete an event row (docs/audit-trail.md, "Event rows the serving
-- role cannot change"). Run as the owner of the router's tables, after `dicom-router migrate` (which
-- runs as that owner), and again after an upgrade whose migrate adds tables:
--
--   psql -v role=dicom_router_app -d DICOMDB -f deploy/postgres/restricted-role.sql
--
-- The role itself is made once by an administrator, e.g.
--   CREATE ROLE dicom_router_app LOGIN PASSWORD '...';   -- and nothing else
\set ON_ERROR_STOP on
SELECT set_config('dicom_router.role', :'role', false) AS "granting to";

GRANT USAGE ON SCHEMA public TO :"role";

-- The event logs: read and append. eventsourcing serialises writers with
-- LOCK TABLE ... IN EXCLUSIVE MODE, which PostgreSQL up to 16 allows only to a role with
-- UPDATE, DELETE or TRUNCATE on the table: UPDATE is granted for that lock alone, and a
-- trigger, which only the tables' owner can drop or disable, refuses every UPDATE and
-- DELETE. (PostgreSQL 17 and later: GRANT MAINTAIN instead of UPDATE, which allows the lock
-- and no change at all; keep the trigger.)
GRANT SELECT, INSERT, UPDATE ON ingest_events, delivery_events, admin_events, access_events
    TO :"role";
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO :"role";  -- the notification ids

CREATE OR REPLACE FUNCTION dicom_router_refuse_event_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are immutable: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;
REVOKE ALL ON FUNCTION dicom_router_refuse_event_change() FROM PUBLIC;

DO $$
DECLARE log text;
BEGIN
    FOREACH log IN ARRAY ARRAY['ingest_events', 'delivery_events', 'admin_events',
                               'access_events'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS events_are_immutable ON %I', log);
        EXECUTE format('CREATE TRIGGER events_are_immutable BEFORE UPDATE OR DELETE ON %I'
                       ' FOR EACH ROW EXECUTE FUNCTION dicom_router_refuse_event_change()', log);
        EXECUTE format('DROP TRIGGER IF EXISTS events_are_not_truncated ON %I', log);
        EXECUTE format('CREATE TRIGGER events_are_not_truncated BEFORE TRUNCATE ON %I'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION dicom_router_refuse_event_change()',
                       log);
    END LOOP;
END $$;

-- The views (jobs, studies, audit, their positions, the node registry) are read models
-- rebuilt from the logs: the router writes them as it applies events. The audit view's
-- rows are protected by their hash chain instead (dicom-router audit verify).
DO $$
DECLARE t text;
BEGIN
    FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public'
             AND tablename NOT IN ('ingest_events', 'delivery_events', 'admin_events',
                                   'access_events') LOOP
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO %I', t,
                       current_setting('dicom_router.role'));
    END LOOP;
END $$;
