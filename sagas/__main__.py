from sagas.cli import main

main()
