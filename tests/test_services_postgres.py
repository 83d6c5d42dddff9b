"""The PostgreSQL server the tests start themselves (tests/services.py), as the hyperparameter search will
use it: an Optuna study in an RDB that several processes, each with its own storage object, share."""

from __future__ import annotations


def test_postgres_server_serves_sqlalchemy_and_a_shared_optuna_study(postgres_server):
    import optuna
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_server.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
            assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar() == "optuna"
    finally:
        engine.dispose()

    # A database of the test's own, so the session's `optuna` database stays empty for the search's tests.
    url = postgres_server.new_database("services_check")
    writer = optuna.storages.RDBStorage(url)
    reader = optuna.storages.RDBStorage(url)
    try:
        study = optuna.create_study(study_name="shared", storage=writer, direction="minimize")
        study.optimize(lambda trial: (trial.suggest_float("x", -1.0, 1.0) - 0.5) ** 2, n_trials=3)

        seen = optuna.load_study(study_name="shared", storage=reader)
        assert optuna.get_all_study_names(reader) == ["shared"]
        assert len(seen.trials) == 3
        assert seen.best_value == study.best_value
        assert seen.best_params == study.best_params
    finally:
        for storage in (writer, reader):
            storage.engine.dispose()
